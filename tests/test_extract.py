import csv
import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_jpeg
from retrieval.data import ImageList
from retrieval.extract import MULTI_SCALES, describe, extract_features
from retrieval.features import SchemaError, read_features, write_features
from retrieval.models import l2n, load_checkpoint

SIZE = 64


def make_images(folder, n=10):
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_jpeg(folder / f"img{i:02d}.jpg", (64, 48) if i % 3 else (48, 64), seed=i) for i in range(n)]
    return ImageList([p.stem for p in paths], paths)


def run(net, images, out, **kw):
    kw = {"image_size": SIZE, "batch_size": 4, "progress": False, **kw}
    return extract_features(net, images, out, **kw)


@pytest.fixture(scope="module")
def net(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint).eval()


def test_features_file_schema(net, tmp_path):
    images = make_images(tmp_path / "img")
    out = run(net, images, tmp_path / "out" / "db.h5")
    ids, feats, attrs = read_features(out)
    assert ids == images.ids and feats.shape == (10, 1280) and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-4)
    assert attrs["schema"] == "retrieval.features" and attrs["schema_version"] == 1 and attrs["complete"]
    assert attrs["scales"] == [1.0] and attrs["image_size"] == SIZE and attrs["dim"] == 1280
    assert not (tmp_path / "out" / "db.h5.tmp").exists()
    assert "10 features written" in (tmp_path / "out" / "extract.log").read_text()


def test_batched_equals_one_by_one(net, tmp_path):
    images = make_images(tmp_path / "img", 6)
    batched = read_features(run(net, images, tmp_path / "b.h5", batch_size=6))[1]
    single = read_features(run(net, images, tmp_path / "s.h5", batch_size=1))[1]
    assert np.allclose(batched, single, atol=1e-5)


def test_multiscale_is_gem_power_mean_over_scales(net, tmp_path):
    x = torch.randn(2, 3, 64, 80)
    p = net.gem_p
    with torch.inference_mode():
        parts = [net(x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                 for s in MULTI_SCALES]
        expected = l2n(torch.stack([v.pow(p) for v in parts]).mean(0).pow(1 / p))
        assert torch.allclose(describe(net, x, MULTI_SCALES), expected, atol=1e-6)
    images = make_images(tmp_path / "img", 3)
    ms = read_features(run(net, images, tmp_path / "ms.h5", scales=MULTI_SCALES))[1]
    ss = read_features(run(net, images, tmp_path / "ss.h5"))[1]
    assert ms.shape == ss.shape and not np.allclose(ms, ss)


def test_bad_inputs_are_skipped_listed_and_nothing_else_lost(net, tmp_path):
    images = make_images(tmp_path / "img", 8)
    bad = {
        "missing": tmp_path / "img" / "missing.jpg",
        "zero": tmp_path / "img" / "zero.jpg",
        "text": tmp_path / "img" / "text.jpg",
        "truncated": tmp_path / "img" / "truncated.jpg",
        "garbage": tmp_path / "img" / "garbage.jpg",
    }
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("not an image")
    big = write_jpeg(tmp_path / "big.jpg", (256, 256), seed=99).read_bytes()
    bad["truncated"].write_bytes(big[: len(big) // 2])
    bad["garbage"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    # Interleave bad files between good ones.
    ids, paths = [], []
    for i, (image_id, path) in enumerate(zip(images.ids, images.paths, strict=True)):
        ids.append(image_id)
        paths.append(path)
        if i < len(bad):
            name = list(bad)[i]
            ids.append(name)
            paths.append(bad[name])
    mixed = ImageList(ids, paths)
    out = run(net, mixed, tmp_path / "out" / "db.h5")
    got_ids, feats, attrs = read_features(out)
    assert got_ids == images.ids  # every good image, in order, once
    assert attrs["n_skipped"] == 5
    clean = read_features(run(net, images, tmp_path / "clean.h5"))[1]
    assert np.allclose(feats, clean, atol=1e-5)
    with open(tmp_path / "out" / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["id"] for r in rows} == set(bad)
    assert all(r["features_file"] == "db.h5" for r in rows)
    reasons = {r["id"]: r["reason"] for r in rows}
    assert reasons["missing"] == "missing file" and reasons["zero"] == "zero-byte file"
    assert reasons["text"] == "not an image" and reasons["truncated"].startswith("corrupt image")
    assert "skipped garbage" in (tmp_path / "out" / "extract.log").read_text()


def test_complete_file_is_not_recomputed(net, tmp_path):
    images = make_images(tmp_path / "img", 4)
    out = run(net, images, tmp_path / "db.h5")
    mtime = out.stat().st_mtime_ns
    run(net, images, out)
    assert out.stat().st_mtime_ns == mtime
    run(net, images, out, image_size=32)  # another job: recomputed
    assert out.stat().st_mtime_ns != mtime and read_features(out)[2]["image_size"] == 32


def test_other_weights_with_the_same_meta_are_recomputed(net, tmp_path):
    """A retrained checkpoint at the same path has the same meta: the weights digest tells them apart."""
    import copy

    images = make_images(tmp_path / "img", 4)
    out = run(net, images, tmp_path / "db.h5")
    before = read_features(out)[1]
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.backbone.conv_stem.weight.mul_(0.5)
    assert other.meta == net.meta
    after = read_features(run(other, images, out))[1]
    assert not np.allclose(before, after)


def test_describe_images_in_memory_equals_the_file(net, tmp_path):
    from retrieval.extract import describe_images

    images = make_images(tmp_path / "img", 5)
    images.paths[2].write_bytes(b"")
    rows, feats = describe_images(net, images, image_size=SIZE, batch_size=2)
    ids, file_feats, _ = read_features(run(net, images, tmp_path / "db.h5"))
    assert rows.tolist() == [0, 1, 3, 4] and ids == [images.ids[i] for i in rows]
    assert np.allclose(feats, file_feats, atol=1e-6)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import retrieval.data.images as images_mod
    from retrieval.data import ImageList
    from retrieval.extract import extract_features
    from retrieval.models import load_checkpoint

    ckpt, folder, out, kill_at = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    real_load = images_mod.load_image

    def load_or_die(path, bbx=None):
        if kill_at != "-" and Path(path).stem == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # as if the machine went away mid-run
        return real_load(path, bbx)

    images_mod.load_image = load_or_die
    paths = sorted(folder.glob("*.jpg"))
    extract_features(load_checkpoint(ckpt), ImageList([p.stem for p in paths], paths), out,
                     image_size=64, batch_size=4, window=4, progress=False)
""")


def test_killed_extraction_resumes_to_identical_features(tiny_checkpoint, tmp_path):
    images = make_images(tmp_path / "img", 14)
    script = tmp_path / "extract_job.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "out" / "db.h5"

    def job(kill_at):
        return subprocess.run([sys.executable, str(script), str(tiny_checkpoint), str(tmp_path / "img"), str(out),
                               kill_at], capture_output=True, text=True, timeout=300)

    killed = job("img09")  # windows of 4: inputs 0-7 are committed, 8-11 are cut short
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    with h5py.File(str(out) + ".tmp", "r") as f:
        assert f.attrs["cursor"] == 8 and not f.attrs["complete"]
    resumed = job("-")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at input 8 of 14" in (tmp_path / "out" / "extract.log").read_text()
    ids, feats, _ = read_features(out)
    ref_ids, ref_feats, _ = read_features(run(load_checkpoint(tiny_checkpoint), images, tmp_path / "ref.h5",
                                              window=4))
    assert ids == ref_ids == images.ids
    assert np.array_equal(feats, ref_feats)


def test_partial_file_of_another_job_is_started_over(net, tmp_path):
    images = make_images(tmp_path / "img", 4)
    out = tmp_path / "db.h5"
    (tmp_path / "db.h5.tmp").write_bytes(b"garbage from a crash")
    run(net, images, out)
    assert read_features(out)[0] == images.ids


def test_wrong_schema_version_is_a_one_line_error(tmp_path):
    path = write_features(tmp_path / "f.h5", ["a", "b"], np.eye(2, dtype=np.float32))
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(SchemaError) as err:
        read_features(path)
    message = str(err.value)
    assert str(path) in message and "version 99" in message and "\n" not in message


def test_not_a_features_file(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(SchemaError, match=r"other\.h5: not a retrieval\.features file"):
        read_features(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_text("nope")
    with pytest.raises(SchemaError, match=r"junk\.h5: not a readable HDF5 file"):
        read_features(tmp_path / "junk.h5")


def test_write_features_validates(tmp_path):
    with pytest.raises(ValueError, match="ids are not unique"):
        write_features(tmp_path / "f.h5", ["a", "a"], np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="float32 or float16"):
        write_features(tmp_path / "f.h5", ["a"], np.zeros((1, 3), np.float64))
    ids, feats, _ = read_features(write_features(tmp_path / "h.h5", ["a"], np.ones((1, 3), np.float16)))
    assert feats.dtype == np.float32 and ids == ["a"]


# ---- aspect buckets, windows, merge

# (width, height): three aspect groups whose exact sizes at 64 px all differ a little (64x48, 64x47, 64x49, ...)
MIXED = [(640, 480), (480, 640), (500, 500), (640, 470), (470, 640), (510, 500), (640, 490), (490, 640),
         (500, 520), (650, 480), (480, 650), (90, 88)]


def mixed_images(folder, n=None):
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_jpeg(folder / f"m{i:02d}.jpg", size, seed=i) for i, size in enumerate(MIXED[:n])]
    return ImageList([p.stem for p in paths], paths)


def test_aspect_buckets_fill_batches_resize_to_templates_and_keep_input_order(net, tmp_path):
    from retrieval.data.images import InputSize, load_image, normalize, resolve_buckets, to_uint8_tensor
    from retrieval.extract import ExtractStats

    images = mixed_images(tmp_path / "img")
    bucketed, exact = ExtractStats(), ExtractStats()
    out = run(net, images, tmp_path / "b.h5", scale="aspect", scales=MULTI_SCALES, stats=bucketed)
    run(net, images, tmp_path / "e.h5", stats=exact)
    assert bucketed.images == exact.images == len(MIXED)
    assert bucketed.batches == 3 and bucketed.occupancy == 1.0  # three buckets of four: full batches of 4
    assert exact.batches > 6 and exact.occupancy < 0.5  # by exact shape they barely share a batch
    ids, feats, attrs = read_features(out)
    assert ids == images.ids  # rows in input order although batches were formed out of order
    assert attrs["scale"] == "aspect"
    assert json.loads(attrs["buckets"]) == [list(t) for t in resolve_buckets("aspect", SIZE)]
    sizing = InputSize.create(SIZE, "long", "aspect")
    by_shape: dict = {}  # each row: its image resized to its template, then every scale of that
    for i, path in enumerate(images.paths):
        x = to_uint8_tensor(sizing.apply(load_image(path)))
        by_shape.setdefault(tuple(x.shape), []).append((i, x))
    assert sorted(by_shape) == [(3, 48, 64), (3, 64, 48), (3, 64, 64)]
    for items in by_shape.values():
        x = normalize(torch.stack([x for _, x in items]), net.meta["mean"], net.meta["std"])
        assert np.allclose(feats[[i for i, _ in items]], describe(net, x, MULTI_SCALES).numpy(), atol=1e-5)


def test_another_bucket_policy_is_another_job(net, tmp_path):
    images = mixed_images(tmp_path / "img", 3)
    out = run(net, images, tmp_path / "db.h5")
    mtime = out.stat().st_mtime_ns
    assert read_features(out)[2]["scale"] == "exact"
    run(net, images, out, scale="aspect")
    assert out.stat().st_mtime_ns != mtime and read_features(out)[2]["scale"] == "aspect"
    mtime = out.stat().st_mtime_ns
    run(net, images, out, scale=[[64, 48], [48, 64], [64, 64]])  # same sizes as "aspect" would not do: other list
    assert out.stat().st_mtime_ns != mtime and read_features(out)[2]["scale"] == "custom"


def test_killed_merge_resumes_without_losing_or_repeating_rows(tmp_path, monkeypatch, caplog):
    import retrieval.features as features_mod
    from retrieval.features import FeatureWriter, merge_features, read_skipped

    rng = np.random.default_rng(0)
    shards = []
    for s, (n_in, bad) in enumerate([(5, {1}), (6, {3, 5})]):  # inputs per shard, the unreadable ones
        writer = FeatureWriter(tmp_path / f"f.shard{s}of2.h5", n_in, 4, "sig")
        for i in range(n_in):
            if i in bad:
                writer.append(i + 1, [], np.zeros((0, 4), np.float32), [(i, "corrupt")])
            else:
                writer.append(i + 1, [f"s{s}_{i}"], rng.normal(size=(1, 4)).astype(np.float32))
        shards.append(writer.finish())
    full = merge_features(shards, tmp_path / "full.h5", [0, 5], signature="job", n_inputs=11)
    monkeypatch.setattr(features_mod, "MERGE_BLOCK", 2)
    calls = {"n": 0}
    real_append = FeatureWriter.append

    def append_then_die(self, *args, **kwargs):
        if calls["n"] == 3:  # the fourth block: mid second shard
            raise KeyboardInterrupt
        calls["n"] += 1
        real_append(self, *args, **kwargs)

    monkeypatch.setattr(FeatureWriter, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        merge_features(shards, tmp_path / "merged.h5", [0, 5], signature="job", n_inputs=11)
    with h5py.File(tmp_path / "merged.h5.tmp", "r") as f:
        assert 5 < f.attrs["cursor"] < 11
    monkeypatch.setattr(FeatureWriter, "append", real_append)
    with caplog.at_level("INFO", logger="retrieval.features"):
        merged = merge_features(shards, tmp_path / "merged.h5", [0, 5], signature="job", n_inputs=11)
    assert "resuming at input" in caplog.text
    ids, feats, attrs = read_features(merged)
    ref_ids, ref_feats, _ = read_features(full)
    assert ids == ref_ids == ["s0_0", "s0_2", "s0_3", "s0_4", "s1_0", "s1_1", "s1_2", "s1_4"]
    assert np.array_equal(feats, ref_feats) and attrs["shards"] == 2 and attrs["n_inputs"] == 11
    assert read_skipped(merged) == read_skipped(full) == [(1, "corrupt"), (8, "corrupt"), (10, "corrupt")]


def test_cudnn_autotunes_only_the_few_shapes_of_aspect_buckets(net):
    from retrieval.extract import ShapeBatcher, cudnn_autotune

    before = torch.backends.cudnn.benchmark
    with cudnn_autotune(True):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert ShapeBatcher(net, (1.0,), 4, cuda, autotune=True).autotune
    assert not ShapeBatcher(net, (1.0,), 4, cuda).autotune  # exact sizes: a search for every new shape
    assert not ShapeBatcher(net, (1.0,), 4, cpu, autotune=True).autotune
