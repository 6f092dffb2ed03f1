import os
import pickle

import pytest

from conftest import shared_path, write_jpeg
from retrieval.data import UnsafePickleError, load_gnd, load_revisitop, safe_load_pickle


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_unpickler_refuses_a_pickle_that_would_run_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [RunsCode()]}))
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl.*(posix|os)\.system"):
        safe_load_pickle(path)


def test_unpickler_refuses_any_class(tmp_path):
    import collections

    path = tmp_path / "od.pkl"
    path.write_bytes(pickle.dumps(collections.OrderedDict(a=1)))
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(path)


def test_unpickler_loads_plain_containers(tmp_path):
    obj = {"a": [1, 2.5, None, True], "b": ("x", b"y"), "c": {3, 4}}
    path = tmp_path / "plain.pkl"
    for protocol in (2, 3, 4, 5):
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        assert safe_load_pickle(path) == obj


def test_truncated_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"imlist": list(range(100))})[:20])
    with pytest.raises(ValueError, match=r"cut\.pkl: not a readable pickle"):
        safe_load_pickle(path)


def _write_dataset(root, gnd, imlist=("d0", "d1", "d2"), qimlist=("q0",)):
    root.mkdir(parents=True, exist_ok=True)
    (root / "jpg").mkdir(exist_ok=True)
    for i, name in enumerate((*imlist, *qimlist)):
        write_jpeg(root / "jpg" / f"{name}.jpg", seed=i)
    cfg = {"imlist": list(imlist), "qimlist": list(qimlist), "gnd": gnd}
    (root / f"gnd_{root.name}.pkl").write_bytes(pickle.dumps(cfg, protocol=3))


def test_load_revisitop_layout(tmp_path):
    _write_dataset(tmp_path / "toy", [{"easy": [0], "hard": [2], "junk": [], "bbx": [1, 2, 30, 40]}])
    ds = load_revisitop(tmp_path / "toy")
    assert ds.name == "toy" and ds.db.ids == ["d0", "d1", "d2"] and ds.queries.ids == ["q0"]
    assert ds.queries.bbx(0) == (1.0, 2.0, 30.0, 40.0)
    assert ds.db.paths[1] == tmp_path / "toy" / "jpg" / "d1.jpg"
    assert ds.gnd[0]["hard"] == [2]


def test_gnd_index_out_of_range_names_file_and_query(tmp_path):
    _write_dataset(tmp_path / "toy", [{"easy": [0], "hard": [7], "junk": []}])
    with pytest.raises(ValueError, match=r"gnd_toy\.pkl: gnd\[0\]\['hard'\] has an index outside 0..2"):
        load_revisitop(tmp_path / "toy")


def test_missing_gnd_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="gnd_nothing.pkl"):
        load_revisitop(tmp_path / "nothing")


@pytest.mark.parametrize("name, n_db, totals", [
    ("roxford5k", 4993, (3029, 2497, 1356)),
    ("rparis6k", 6322, (6874, 10350, 7153)),
])
def test_real_ground_truth_loads_safely(name, n_db, totals):
    cfg = load_gnd(shared_path("revisitop", f"gnd_{name}.pkl"))
    assert len(cfg["imlist"]) == n_db and len(cfg["qimlist"]) == 70
    assert tuple(sum(len(g[k]) for g in cfg["gnd"]) for k in ("easy", "hard", "junk")) == totals
    assert not set(cfg["imlist"]) & set(cfg["qimlist"])
    assert all(len(g["bbx"]) == 4 for g in cfg["gnd"])
