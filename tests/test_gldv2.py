"""GLDv2 metadata readers, image layout, solution parsing and the retrieval benchmark loader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from retrieval.data.gldv2 import (
    gldv2_image_path,
    load_gldv2_retrieval,
    read_ids,
    read_retrieval_solution,
    read_train,
    read_train_clean,
    write_train_clean,
)

# 16-character hex ids, as in the real files
IDX = [str(i) * 16 for i in range(6)]  # 000..., 111..., ..., 555...
TST = [f"{c}{c}0123456789abcd" for c in "abcdef"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def one_line_error(excinfo: pytest.ExceptionInfo, path: Path, line: int) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert f"line {line}:" in msg
    return msg


# ---------------------------------------------------------------------------------------- layout


def test_image_path_layout(tmp_path):
    p = gldv2_image_path(tmp_path, "index", "0123456789abcdef")
    assert p == tmp_path / "index" / "0" / "1" / "2" / "0123456789abcdef.jpg"
    assert gldv2_image_path("data/gldv2", "train", "abc") == Path("data/gldv2/train/a/b/c/abc.jpg")


@pytest.mark.parametrize("bad", ["ab", "", "a/bc", "ab c", "..\\x"])
def test_image_path_rejects_bad_ids(bad):
    with pytest.raises(ValueError, match="image id"):
        gldv2_image_path("root", "test", bad)


# ------------------------------------------------------------------------------------- train.csv


def test_read_train(tmp_path):
    f = write(tmp_path / "train.csv",
              "id,url,landmark_id\n"
              "6e158a47eb2ca3f6,https://upload.wikimedia.org/a.jpg,142820\n"
              '202cd79556f30760,"http://x/y,z.jpg",104169\n'
              "\n"  # blank lines are skipped
              "3ad87684c99c06e1,http://x/b.jpg,37914\n")
    ids, labels = read_train(f)
    assert ids == ["6e158a47eb2ca3f6", "202cd79556f30760", "3ad87684c99c06e1"]
    assert labels.dtype == np.int64
    assert labels.tolist() == [142820, 104169, 37914]


def test_read_train_extra_and_reordered_columns_and_bom(tmp_path):
    f = tmp_path / "train.csv"
    f.write_bytes("\ufefflandmark_id,id,url,extra\n7,aaa0000000000000,u,x\n".encode())
    ids, labels = read_train(f)
    assert ids == ["aaa0000000000000"] and labels.tolist() == [7]


def test_read_train_empty_body(tmp_path):
    ids, labels = read_train(write(tmp_path / "train.csv", "id,url,landmark_id\n"))
    assert ids == [] and labels.shape == (0,) and labels.dtype == np.int64


def test_read_train_non_integer_landmark(tmp_path):
    f = write(tmp_path / "train.csv", "id,url,landmark_id\naaa0000000000000,u,1\nbbb0000000000000,u,x12\n")
    with pytest.raises(ValueError) as ei:
        read_train(f)
    msg = one_line_error(ei, f, 3)
    assert "landmark_id" in msg and "x12" in msg


def test_read_train_missing_column(tmp_path):
    f = write(tmp_path / "train.csv", "id,url\naaa0000000000000,u\n")
    with pytest.raises(ValueError) as ei:
        read_train(f)
    assert "'landmark_id'" in one_line_error(ei, f, 1)


def test_read_train_empty_id(tmp_path):
    f = write(tmp_path / "train.csv", "id,url,landmark_id\naaa0000000000000,u,1\n\n ,u,2\n")
    with pytest.raises(ValueError) as ei:
        read_train(f)
    assert "empty id" in one_line_error(ei, f, 4)


def test_read_train_short_row(tmp_path):
    f = write(tmp_path / "train.csv", "id,url,landmark_id\naaa0000000000000,u\n")
    with pytest.raises(ValueError) as ei:
        read_train(f)
    assert "fields" in one_line_error(ei, f, 2)


def test_read_train_multiline_quoted_field_counts_lines(tmp_path):
    # a quoted url spanning two physical lines: the bad row after it is on file line 4
    f = write(tmp_path / "train.csv", 'id,url,landmark_id\naaa0000000000000,"u\nv",1\nbbb0000000000000,u,?\n')
    with pytest.raises(ValueError) as ei:
        read_train(f)
    one_line_error(ei, f, 4)


def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope" / "train.csv"
    for reader in (read_train, read_train_clean, read_ids, read_retrieval_solution):
        with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
            reader(missing)
    empty = write(tmp_path / "empty.csv", "")
    with pytest.raises(ValueError) as ei:
        read_ids(empty)
    assert "empty file" in one_line_error(ei, empty, 1)


def test_not_utf8(tmp_path):
    f = tmp_path / "index.csv"
    f.write_bytes(b"id\n\xff\xfe\xfa\n")
    with pytest.raises(ValueError, match="UTF-8") as ei:
        read_ids(f)
    assert str(f) in str(ei.value)


# ------------------------------------------------------------------------------- train_clean.csv


def test_read_train_clean(tmp_path):
    f = write(tmp_path / "train_clean.csv",
              "landmark_id,images\n"
              "1,17660ef415d37059 92b6290d571448f6 cd41bf948edc0340\n"
              "7,fb09f1e98c6d2f70\n")
    assert read_train_clean(f) == {
        1: ["17660ef415d37059", "92b6290d571448f6", "cd41bf948edc0340"],
        7: ["fb09f1e98c6d2f70"],
    }


def test_read_train_clean_large_field(tmp_path):
    images = [f"{i:016x}" for i in range(20000)]  # ~340 KB in one field, above the csv default limit
    f = write(tmp_path / "train_clean.csv", "landmark_id,images\n5," + " ".join(images) + "\n")
    assert read_train_clean(f) == {5: images}


@pytest.mark.parametrize(("body", "line", "needle"), [
    ("1,aaa0000000000000\nabc,bbb0000000000000\n", 3, "landmark_id must be an integer"),
    ("1,aaa0000000000000\n2,\n", 3, "no images"),
    ("1,aaa0000000000000\n1,bbb0000000000000\n", 3, "repeated (first on line 2)"),
    ("1,aaa0000000000000 a/b\n", 2, "bad image id"),
])
def test_read_train_clean_errors(tmp_path, body, line, needle):
    f = write(tmp_path / "train_clean.csv", "landmark_id,images\n" + body)
    with pytest.raises(ValueError) as ei:
        read_train_clean(f)
    assert needle in one_line_error(ei, f, line)


def test_read_train_clean_missing_column(tmp_path):
    f = write(tmp_path / "train_clean.csv", "landmark,images\n1,a\n")
    with pytest.raises(ValueError) as ei:
        read_train_clean(f)
    assert "'landmark_id'" in one_line_error(ei, f, 1)


def test_write_train_clean_round_trip(tmp_path):
    mapping = {
        np.int64(12): ["aaa0000000000000", "bbb0000000000000"],
        3: ("ccc0000000000000",),
        203092: ["ddd0000000000000", "eee0000000000000", "fff0000000000000"],
    }
    out = tmp_path / "cleaned_subsets" / "subset.csv"
    write_train_clean(out, mapping)
    text = out.read_text()
    assert text.splitlines()[0] == "landmark_id,images"
    assert text.splitlines()[1] == "12,aaa0000000000000 bbb0000000000000"
    assert "\r" not in text
    back = read_train_clean(out)
    assert back == {int(k): list(v) for k, v in mapping.items()}
    assert list(back) == [12, 3, 203092]  # mapping order kept
    assert os.listdir(out.parent) == ["subset.csv"]  # no temporary left behind


def test_write_train_clean_replaces_atomically_and_keeps_old_file_on_error(tmp_path):
    out = tmp_path / "train_clean.csv"
    write_train_clean(out, {1: ["aaa0000000000000"]})
    write_train_clean(out, {2: ["bbb0000000000000"]})
    assert read_train_clean(out) == {2: ["bbb0000000000000"]}
    for bad in ({3: []}, {3: ["has space"]}, {"x": ["ccc0000000000000"]}, {3: "ccc0000000000000"},
                {1: ["a"], "1": ["b"]}):
        with pytest.raises(ValueError, match=str(out.name)):
            write_train_clean(out, bad)
    assert read_train_clean(out) == {2: ["bbb0000000000000"]}
    assert os.listdir(tmp_path) == ["train_clean.csv"]


# ----------------------------------------------------------------------------- index / test.csv


def test_read_ids(tmp_path):
    f = write(tmp_path / "index.csv", "id\n" + "\n".join(IDX) + "\n")
    assert read_ids(f) == IDX
    # v2.1-style extra columns are tolerated
    g = write(tmp_path / "test.csv", "id,url,extra\naa01,http://u,1\nbb02,http://v,2\n")
    assert read_ids(g) == ["aa01", "bb02"]


@pytest.mark.parametrize(("body", "line", "needle"), [
    ("aaa\n\n,extra\n", 4, "empty id"),
    ("aaa\nbbb\naaa\n", 4, "repeated (first on line 2)"),
    ("aaa\nb b\n", 3, "bad id"),
])
def test_read_ids_errors(tmp_path, body, line, needle):
    f = write(tmp_path / "index.csv", "id\n" + body)
    with pytest.raises(ValueError) as ei:
        read_ids(f)
    assert needle in one_line_error(ei, f, line)


def test_read_ids_missing_column(tmp_path):
    f = write(tmp_path / "test.csv", "image_id\naaa\n")
    with pytest.raises(ValueError) as ei:
        read_ids(f)
    assert "'id'" in one_line_error(ei, f, 1)


# ------------------------------------------------------------------------------ solution parsing

SOLUTION = (
    "id,images,Usage\n"
    f"{TST[0]},{IDX[1]} {IDX[3]},Public\n"
    f"{TST[1]},None,Ignored\n"
    f"{TST[2]},{IDX[0]},Private\n"
    f"{TST[3]},None,Ignored\n"
    f"{TST[4]},{IDX[5]} {IDX[2]} {IDX[5]},Public\n"
)


def test_read_retrieval_solution(tmp_path):
    f = write(tmp_path / "sol.csv", SOLUTION)
    sol = read_retrieval_solution(f)
    assert sol == {
        TST[0]: [IDX[1], IDX[3]],
        TST[2]: [IDX[0]],
        TST[4]: [IDX[5], IDX[2]],  # repeated id kept once
    }
    assert list(sol) == [TST[0], TST[2], TST[4]]
    assert list(read_retrieval_solution(f, usage="Private")) == [TST[2]]
    assert list(read_retrieval_solution(f, usage=("Public",))) == [TST[0], TST[4]]
    # None rows stay out even when Ignored is selected
    every = read_retrieval_solution(f, usage=("Public", "Private", "Ignored"))
    assert list(every) == [TST[0], TST[2], TST[4]]
    with pytest.raises(ValueError, match="usage"):
        read_retrieval_solution(f, usage=("public",))


def test_solution_none_in_public_row_is_left_out(tmp_path):
    f = write(tmp_path / "sol.csv", f"id,images,Usage\n{TST[0]},None,Public\n{TST[1]},,Private\n")
    assert read_retrieval_solution(f) == {}


@pytest.mark.parametrize(("body", "line", "needle"), [
    (f"{TST[0]},{IDX[0]},Public\n{TST[1]},{IDX[1]},Secret\n", 3, "Usage must be one of"),
    (f"{TST[0]},{IDX[0]},Public\n{TST[0]},{IDX[1]},Private\n", 3, "repeated (first on line 2)"),
    (f",{IDX[0]},Public\n", 2, "empty id"),
    (f"{TST[0]},{IDX[0]}\n", 2, "fields"),
])
def test_read_retrieval_solution_errors(tmp_path, body, line, needle):
    f = write(tmp_path / "sol.csv", "id,images,Usage\n" + body)
    with pytest.raises(ValueError) as ei:
        read_retrieval_solution(f)
    assert needle in one_line_error(ei, f, line)


def test_read_retrieval_solution_missing_usage_column(tmp_path):
    f = write(tmp_path / "sol.csv", f"id,images\n{TST[0]},{IDX[0]}\n")
    with pytest.raises(ValueError) as ei:
        read_retrieval_solution(f)
    assert "'Usage'" in one_line_error(ei, f, 1)


def test_read_retrieval_solution_checks_known_ids(tmp_path):
    f = write(tmp_path / "sol.csv", SOLUTION)
    with pytest.raises(ValueError) as ei:
        read_retrieval_solution(f, index_ids=set(IDX) - {IDX[2]})
    msg = one_line_error(ei, f, 6)
    assert IDX[2] in msg and "not in the index" in msg
    with pytest.raises(ValueError) as ei:
        read_retrieval_solution(f, query_ids=set(TST) - {TST[1]})
    assert "not in the test" in one_line_error(ei, f, 3)


# ------------------------------------------------------------------------- load_gldv2_retrieval


def make_gldv2(root: Path) -> None:
    meta = root / "metadata"
    write(meta / "index.csv", "id\n" + "\n".join(IDX) + "\n")
    write(meta / "test.csv", "id\n" + "\n".join(TST) + "\n")
    write(meta / "retrieval_solution_v2.1.csv", SOLUTION)


def test_load_gldv2_retrieval_end_to_end(tmp_path):
    make_gldv2(tmp_path)
    ds = load_gldv2_retrieval(tmp_path)
    assert ds.name == "gldv2" and ds.protocol == "gldv2"  # scored by mAP@100
    assert ds.db.ids == IDX
    assert ds.queries.ids == [TST[0], TST[2], TST[4]]  # test.csv order, only scored queries
    assert ds.queries.paths[1] == tmp_path / "test" / TST[2][0] / TST[2][1] / TST[2][2] / f"{TST[2]}.jpg"
    assert ds.db.paths[3] == tmp_path / "index" / "3" / "3" / "3" / f"{IDX[3]}.jpg"
    expected = {TST[0]: [IDX[1], IDX[3]], TST[2]: [IDX[0]], TST[4]: [IDX[5], IDX[2]]}
    for q, rec in zip(ds.queries.ids, ds.gnd, strict=True):
        assert set(rec) >= {"easy", "hard", "junk"}
        assert rec["hard"] == [] and rec["junk"] == []
        assert [ds.db.ids[j] for j in rec["easy"]] == expected[q]
    assert ds.gnd[0]["easy"] == [1, 3]


def test_load_gldv2_retrieval_custom_solution_and_usage(tmp_path):
    make_gldv2(tmp_path)
    sol = write(tmp_path / "elsewhere" / "my_solution.csv",
                f"id,images,Usage\n{TST[5]},{IDX[4]},Private\n{TST[0]},{IDX[0]},Public\n")
    ds = load_gldv2_retrieval(tmp_path, sol)
    assert ds.queries.ids == [TST[0], TST[5]]
    assert [rec["easy"] for rec in ds.gnd] == [[0], [4]]
    ds = load_gldv2_retrieval(tmp_path, sol, usage="Private")
    assert ds.queries.ids == [TST[5]]


def test_load_gldv2_retrieval_unknown_index_id(tmp_path):
    make_gldv2(tmp_path)
    sol = write(tmp_path / "metadata" / "retrieval_solution_v2.1.csv",
                f"id,images,Usage\n{TST[0]},{IDX[0]},Public\n{TST[1]},{IDX[1]} ffffffffffffffff,Private\n")
    with pytest.raises(ValueError) as ei:
        load_gldv2_retrieval(tmp_path)
    assert "ffffffffffffffff" in one_line_error(ei, sol, 3)


def test_load_gldv2_retrieval_unknown_query_id(tmp_path):
    make_gldv2(tmp_path)
    sol = write(tmp_path / "metadata" / "retrieval_solution_v2.1.csv",
                f"id,images,Usage\n9999999999999999,{IDX[0]},Public\n")
    with pytest.raises(ValueError) as ei:
        load_gldv2_retrieval(tmp_path)
    assert "9999999999999999" in one_line_error(ei, sol, 2)


def test_load_gldv2_retrieval_missing_files(tmp_path):
    make_gldv2(tmp_path)
    (tmp_path / "metadata" / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="test.csv"):
        load_gldv2_retrieval(tmp_path)
