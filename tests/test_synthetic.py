"""The built-in synthetic benchmark: revisitop layout, plain-type ground truth, determinism, caching."""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from retrieval.data.synthetic import SIZES, SyntheticConfig, contact_sheet, make_synthetic

TINY = SIZES["tiny"]
MICRO = SyntheticConfig(n_landmarks=2, views_per_landmark=3, queries_per_landmark=1, n_distractors=3,
                        n_families=2)
PLAIN = (dict, list, str, int, float)


def _walk_plain(obj: object, where: str = "gnd") -> None:
    assert type(obj) in PLAIN, f"{where}: {type(obj).__name__} is not a plain python type"
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert type(k) is str, f"{where}: key {k!r} is not a str"
            _walk_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _walk_plain(v, f"{where}[{i}]")


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "jpg").glob("*.jpg"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    gnd_path = make_synthetic(root, "tiny", seed=0)
    assert gnd_path == root / "gnd_synthetic.pkl"
    return root


@pytest.fixture(scope="module")
def cfg(tiny: Path) -> dict:
    with open(tiny / "gnd_synthetic.pkl", "rb") as fh:
        return pickle.load(fh)


def test_sizes_presets() -> None:
    assert {"tiny", "default", "large"} <= set(SIZES)
    assert all(isinstance(c, SyntheticConfig) for c in SIZES.values())
    assert SIZES["tiny"].n_images < 100
    assert 700 <= SIZES["default"].n_images <= 1100
    assert SIZES["large"].n_images > SIZES["default"].n_images
    with pytest.raises(ValueError):
        make_synthetic("/nonexistent-unused", "huge")


def test_layout_and_plain_types(tiny: Path, cfg: dict) -> None:
    assert set(cfg) == {"imlist", "qimlist", "gnd"}
    _walk_plain(cfg)
    imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    assert len(imlist) == TINY.n_landmarks * TINY.views_per_landmark + TINY.n_distractors
    assert len(qimlist) == TINY.n_landmarks * TINY.queries_per_landmark == len(gnd)
    assert len(set(imlist)) == len(imlist) and len(set(qimlist)) == len(qimlist)
    assert not set(imlist) & set(qimlist)
    assert all("." not in n and "/" not in n for n in imlist + qimlist)
    marker = json.loads((tiny / "synthetic.json").read_text())
    assert marker["seed"] == 0 and "format_version" in marker and marker["config"]["n_landmarks"] == 6


def test_images_open_with_expected_sizes(tiny: Path, cfg: dict) -> None:
    allowed = {tuple(s) for s in TINY.image_sizes}
    files = {p.stem for p in (tiny / "jpg").iterdir()}
    assert files == set(cfg["imlist"]) | set(cfg["qimlist"])
    for name in cfg["imlist"] + cfg["qimlist"]:
        with Image.open(tiny / "jpg" / f"{name}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size in allowed


def test_ground_truth_is_consistent(tiny: Path, cfg: dict) -> None:
    n_db = len(cfg["imlist"])
    positives = set()
    for i, rec in enumerate(cfg["gnd"]):
        assert set(rec) == {"easy", "hard", "junk", "bbx"}
        lists = [rec["easy"], rec["hard"], rec["junk"]]
        for lst in lists:
            assert all(type(j) is int and 0 <= j < n_db for j in lst)
            assert len(set(lst)) == len(lst)
        e, h, j = (set(x) for x in lists)
        assert not (e & h) and not (e & j) and not (h & j), f"query {i}: easy/hard/junk overlap"
        assert e | h, f"query {i} has no easy or hard positive"
        positives |= e | h | j
        with Image.open(tiny / "jpg" / f"{cfg['qimlist'][i]}.jpg") as im:
            w, h_ = im.size
        x1, y1, x2, y2 = rec["bbx"]
        assert all(type(v) is float for v in rec["bbx"])
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h_, f"query {i}: bbx {rec['bbx']} outside {w}x{h_}"
        assert x2 - x1 >= 16 and y2 - y1 >= 16
    # distractors exist: database images that are nobody's positive or junk
    assert len(positives) < n_db
    assert n_db - len(positives) >= TINY.n_distractors


def test_queries_of_a_landmark_share_ground_truth(cfg: dict) -> None:
    groups = {(tuple(r["easy"]), tuple(r["hard"]), tuple(r["junk"])) for r in cfg["gnd"]}
    assert len(groups) == TINY.n_landmarks  # one ground-truth group per landmark
    seen: dict[int, tuple] = {}
    for g in groups:  # a database image belongs to at most one landmark
        for j in (*g[0], *g[1], *g[2]):
            assert seen.setdefault(j, g) == g


def test_same_seed_identical_different_seed_differs(tiny: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    make_synthetic(again, "tiny", seed=0)
    assert _digests(again) == _digests(tiny)
    assert (again / "gnd_synthetic.pkl").read_bytes() == (tiny / "gnd_synthetic.pkl").read_bytes()
    other = tmp_path / "other"
    make_synthetic(other, "tiny", seed=1)
    a, b = _digests(tiny), _digests(other)
    assert len(set(a.values()) & set(b.values())) == 0


def test_parallel_rendering_is_identical(tiny: Path, tmp_path: Path) -> None:
    make_synthetic(tmp_path, "tiny", seed=0, workers=2)
    assert _digests(tmp_path) == _digests(tiny)


def test_second_call_reuses_and_other_config_regenerates(tmp_path: Path) -> None:
    gnd = make_synthetic(tmp_path, MICRO, seed=0)
    some_jpg = next((tmp_path / "jpg").iterdir())
    marker = tmp_path / "synthetic.json"

    def stamps() -> tuple[int, int, int]:
        return gnd.stat().st_mtime_ns, some_jpg.stat().st_mtime_ns, marker.stat().st_mtime_ns

    before = stamps()
    assert make_synthetic(tmp_path, MICRO, seed=0) == gnd
    assert make_synthetic(str(tmp_path), replace(MICRO), seed=0) == gnd  # equal config object, str root
    assert stamps() == before
    digests = _digests(tmp_path)
    # a different config regenerates (fewer distractors -> fewer images)
    smaller = replace(MICRO, n_distractors=1)
    make_synthetic(tmp_path, smaller, seed=0)
    with open(gnd, "rb") as fh:
        assert len(pickle.load(fh)["imlist"]) == smaller.n_landmarks * smaller.views_per_landmark + 1
    assert len(list((tmp_path / "jpg").iterdir())) == smaller.n_images
    assert json.loads(marker.read_text())["config"]["n_distractors"] == 1
    # a different seed regenerates too, and going back reproduces the first benchmark
    make_synthetic(tmp_path, MICRO, seed=3)
    assert _digests(tmp_path) != digests
    make_synthetic(tmp_path, MICRO, seed=0)
    assert _digests(tmp_path) == digests
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_killed_generation_does_not_break_next_call(tmp_path: Path) -> None:
    # what a run killed half-way leaves: a temp folder, a partial jpg/ and no completion marker
    stale = tmp_path / ".tmp-synthetic-999999-deadbeef"
    (stale / "jpg").mkdir(parents=True)
    (stale / "jpg" / "synth_db_00000.jpg").write_bytes(b"truncated")
    (tmp_path / "jpg").mkdir()
    (tmp_path / "jpg" / "synth_db_00000.jpg").write_bytes(b"half written")
    gnd = make_synthetic(tmp_path, MICRO, seed=0)
    assert not stale.exists()
    with open(gnd, "rb") as fh:
        cfg = pickle.load(fh)
    for name in cfg["imlist"] + cfg["qimlist"]:
        with Image.open(tmp_path / "jpg" / f"{name}.jpg") as im:
            im.load()
    # a complete-looking benchmark with a missing image (marker intact) is regenerated as well
    victim = tmp_path / "jpg" / f"{cfg['imlist'][0]}.jpg"
    victim.unlink()
    make_synthetic(tmp_path, MICRO, seed=0)
    assert victim.is_file()
    # an unreadable marker does not make the tree look complete
    (tmp_path / "synthetic.json").write_text("{not json")
    make_synthetic(tmp_path, MICRO, seed=0)
    assert json.loads((tmp_path / "synthetic.json").read_text())["seed"] == 0


def test_refuses_to_replace_another_datasets_images(tmp_path: Path) -> None:
    (tmp_path / "jpg").mkdir()
    (tmp_path / "jpg" / "all_souls_000013.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        make_synthetic(tmp_path, MICRO, seed=0)
    assert (tmp_path / "jpg" / "all_souls_000013.jpg").read_bytes() == b"not ours"


def test_contact_sheet(tiny: Path, tmp_path: Path) -> None:
    out = contact_sheet(tiny, tmp_path / "sheet.png", n_rows=3)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(n_landmarks=0)
    with pytest.raises(ValueError):
        SyntheticConfig(label_mix=(0.0, 0.0, 0.0))
