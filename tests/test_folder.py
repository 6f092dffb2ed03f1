import pytest

from conftest import shared_path, write_jpeg
from retrieval.data import load_dataset, load_folder, read_image_csv


def test_csv_with_query_column(tmp_path):
    for name in ("a1", "a2", "b1", "b2"):
        write_jpeg(tmp_path / f"{name}.jpg")
    (tmp_path / "gt.csv").write_text("id,path,landmark_id,query\nA1,a1.jpg,a,1\nA2,a2.jpg,a,0\n"
                                     "B1,b1.jpg,b,1\nB2,b2.jpg,b,0\n")
    ds = load_folder(tmp_path / "gt.csv")
    assert ds.queries.ids == ["A1", "B1"] and ds.db.ids == ["A2", "B2"]
    assert ds.gnd == [{"easy": [0], "hard": [], "junk": []}, {"easy": [1], "hard": [], "junk": []}]
    assert ds.db.paths[0] == tmp_path / "a2.jpg"


def test_csv_without_query_column_is_leave_one_out(tmp_path):
    (tmp_path / "gt.csv").write_text("path,landmark_id\nx/a1.jpg,a\nx/a2.jpg,a\nx/b1.jpg,b\nx/c.jpg,\n")
    ds = load_folder(tmp_path / "gt.csv")
    assert ds.queries.ids == ["x/a1", "x/a2", "x/b1"]  # the unlabelled image is database only
    assert ds.db.ids == ["x/a1", "x/a2", "x/b1", "x/c"]
    assert ds.gnd[0] == {"easy": [1], "hard": [], "junk": [0]}  # itself is junk
    assert ds.gnd[2] == {"easy": [], "hard": [], "junk": [2]}


def test_domain_column_groups_images(tmp_path):
    (tmp_path / "gt.csv").write_text("path,landmark_id,domain\na.jpg,a,shops\nb.jpg,a,shops\nc.jpg,c,\n")
    assert [r["domain"] for r in read_image_csv(tmp_path / "gt.csv")] == ["shops", "shops", None]
    assert load_folder(tmp_path / "gt.csv").domains == {"a": "shops", "b": "shops"}


def test_unlabelled_csv_has_no_ground_truth(tmp_path):
    (tmp_path / "list.csv").write_text("id,path\n1,a.jpg\n2,b.jpg\n")
    ds = load_folder(tmp_path / "list.csv")
    assert ds.gnd == [] and len(ds.db) == 2


@pytest.mark.parametrize("text, match", [
    ("id,file\n1,a.jpg\n", r"line 1: header needs a 'path'"),
    ("id,path\n1,a.jpg\n2,\n", r"line 3: empty 'path'"),
    ("id,path\n1,a.jpg\n1,b.jpg\n", r"line 3: duplicate id '1'"),
    ("path,query\na.jpg,maybe\n", r"line 2: query must be 0 or 1"),
    ("path\n", "no rows"),
])
def test_bad_csv_names_file_and_line(tmp_path, text, match):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match=r"bad\.csv: " + match):
        read_image_csv(tmp_path / "bad.csv")


def test_load_dataset_spec_and_unknown(tmp_path):
    (tmp_path / "l.csv").write_text("path,landmark_id\na.jpg,1\nb.jpg,1\n")
    assert len(load_dataset(f"folder:{tmp_path / 'l.csv'}").queries) == 2
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_shared_landmarks_folder():
    ds = load_folder(shared_path("landmarks", "ground_truth.csv"))
    assert len(ds.queries) == 8 and len(ds.db) == 25
    assert all(p.is_file() for p in ds.db.paths)
    sacre = ds.queries.ids.index(next(i for i in ds.queries.ids if "sacre_coeur" in i))
    assert len(ds.gnd[sacre]["easy"]) == 11
