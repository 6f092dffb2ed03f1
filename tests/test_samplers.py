import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.data.samplers import (
    SIZE_TEMPLATES,
    TrainBatchSampler,
    assign_templates,
    class_balanced_indices,
    epoch_batches,
    merge_singleton_groups,
    resolve_templates,
    scale_templates,
)


def _toy(n: int = 403, n_classes: int = 23, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Skewed class sizes and template groups (no group near-empty, so no singleton merging)."""
    rng = np.random.default_rng(seed)
    labels = np.minimum(rng.geometric(0.15, n) - 1, n_classes - 1)
    groups = rng.choice(5, n, p=[0.3, 0.1, 0.35, 0.1, 0.15])
    return labels, groups


def _rank_batches(labels, groups, batch_size, world_size, epoch=0, **kw):
    out = []
    for rank in range(world_size):
        s = TrainBatchSampler(labels, groups, batch_size, rank=rank, world_size=world_size, **kw)
        s.set_epoch(epoch)
        out.append((s, list(s)))
    return out


# ---- size templates


def test_size_templates_are_the_landmark2019_sets_ordered_by_aspect():
    assert SIZE_TEMPLATES["SS2"] == ((480, 320), (480, 352), (384, 384), (352, 480), (320, 480))
    assert SIZE_TEMPLATES["M2"][0] == (800, 544) and SIZE_TEMPLATES["M2"][2] == (704, 704)
    for name, tpl in SIZE_TEMPLATES.items():
        ratios = [h / w for w, h in tpl]
        assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios), name


def test_assign_templates_known_sizes():
    sizes = np.array([[640, 427], [427, 640], [500, 500], [0, 0], [-1, 300], [1024, 768], [300, 1000]])
    got = assign_templates(sizes, "SS2")
    assert got.dtype == np.int64 and got.shape == (7,)
    tpl = SIZE_TEMPLATES["SS2"]
    assert [tpl[i] for i in got[:5]] == [(480, 320), (320, 480), (384, 384), (384, 384), (384, 384)]
    assert tpl[got[5]] == (480, 352)  # 0.75 sits nearer 0.733 than 1.0
    assert tpl[got[6]] == (320, 480)  # very tall: the most portrait template


def test_assign_templates_uses_log_ratio_and_explicit_order():
    # h/w = 1.2 is nearer 0.5 linearly but nearer 2.0 in log space
    assert assign_templates(np.array([[100, 120]]), [(200, 100), (100, 200)]).tolist() == [1]
    # unsorted explicit templates: ids refer to the given order; unknown -> most square
    tpl = [(320, 480), (300, 310), (480, 320)]
    assert assign_templates(np.array([[640, 427], [427, 640], [0, 50]]), tpl).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="sizes"):
        assign_templates(np.zeros((3, 3)), "SS2")


def test_resolve_templates():
    assert resolve_templates("S2") is SIZE_TEMPLATES["S2"]
    got = resolve_templates([[480, 320], np.array([384, 384])])
    assert got == ((480, 320), (384, 384)) and all(type(v) is int for p in got for v in p)
    for bad in ["XL", [], [(480,)], [(0, 320)], [(480.5, 320)], [(True, 3)], 5]:
        with pytest.raises(ValueError, match="templates"):
            resolve_templates(bad)
    with pytest.raises(ValueError, match="'XL'"):
        resolve_templates("XL")


def test_scale_templates():
    assert scale_templates("SS2", 1.0) == SIZE_TEMPLATES["SS2"]
    assert scale_templates([(480, 320)], 2.0) == ((960, 640),)
    up = scale_templates("SS2", 5 / 3)
    assert up[0] == (800, 544) and all(v % 32 == 0 for p in up for v in p)
    assert scale_templates([(100, 50)], 0.1, multiple=16) == ((16, 16),)  # never below one multiple
    with pytest.raises(ValueError, match="factor"):
        scale_templates("SS2", 0)


# ---- class cap


def test_class_cap_per_class_and_fresh_subsets():
    sizes = [1, 5, 30, 100]
    labels = np.repeat(np.array([7, -3, 1000, 42]), sizes)
    np.random.default_rng(1).shuffle(labels)
    a = class_balanced_indices(labels, 10, seed=3, epoch=0)
    assert (np.diff(a) > 0).all() and a.dtype == np.int64  # sorted, distinct
    for lab, size in zip([7, -3, 1000, 42], sizes, strict=True):
        assert (labels[a] == lab).sum() == min(size, 10)
    assert np.array_equal(a, class_balanced_indices(labels, 10, seed=3, epoch=0))
    assert not np.array_equal(a, class_balanced_indices(labels, 10, seed=3, epoch=1))
    assert not np.array_equal(a, class_balanced_indices(labels, 10, seed=4, epoch=0))
    # over epochs every image of the big class gets its turn (not always the same 10)
    seen = np.unique(np.concatenate([class_balanced_indices(labels, 10, 3, e) for e in range(60)]))
    assert np.array_equal(seen, np.arange(len(labels)))
    assert np.array_equal(class_balanced_indices(labels, None, 3, 0), np.arange(len(labels)))
    with pytest.raises(ValueError, match="cap"):
        class_balanced_indices(labels, 0, 3, 0)


def test_class_cap_sparse_labels():
    labels = np.array([10**12, 5, 10**12, 10**12, 5, -(10**9)])
    got = class_balanced_indices(labels, 2, seed=0, epoch=0)
    assert np.bincount(np.unique(labels, return_inverse=True)[1].ravel()[got]).tolist() == [1, 2, 2]


def test_class_cap_at_gldv2_scale_is_fast():
    n, c, cap = 2_000_000, 100_000, 20
    labels = np.random.default_rng(0).integers(0, c, n)
    t0 = time.perf_counter()
    got = class_balanced_indices(labels, cap, seed=0, epoch=5)
    elapsed = time.perf_counter() - t0
    counts = np.bincount(labels[got], minlength=c)
    assert np.array_equal(counts, np.minimum(np.bincount(labels, minlength=c), cap))
    assert (np.diff(got) > 0).all()  # sorted and distinct
    assert elapsed < 5.0, f"{elapsed:.2f} s: not vectorised?"


# ---- the batch plan


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_shares_partition_the_epoch(world_size):
    labels, groups = _toy()
    bs, cap = 8, 30
    shares = _rank_batches(labels, groups, bs, world_size, epoch=2, seed=11, cap=cap)
    selected = class_balanced_indices(labels, cap, seed=11, epoch=2)
    counts = {len(b) for _, b in shares}
    assert len(counts) == 1  # every rank runs the same number of steps
    seen = []
    for s, batches in shares:
        assert len(s) == s.batches_per_epoch == len(batches) > 0
        for batch in batches:
            assert 2 <= len(batch) <= bs + 1
            idx, tpl, ep = zip(*batch, strict=True)
            assert set(ep) == {2} and len(set(tpl)) == 1
            assert np.array_equal(groups[list(idx)], np.full(len(idx), tpl[0]))  # resized to its own template
            assert all(type(v) is int for key in batch for v in key)
            seen.extend(idx)
    assert len(seen) == len(set(seen))  # disjoint across ranks, no repeats
    assert sorted(seen) == selected.tolist()  # complete


def test_plan_is_deterministic_and_changes_with_epoch_and_seed():
    labels, groups = _toy()
    a = TrainBatchSampler(labels, groups, 8, rank=1, world_size=2, seed=5, cap=25)
    b = TrainBatchSampler(labels, groups, 8, rank=1, world_size=2, seed=5, cap=25)
    for s in (a, b):
        s.set_epoch(3)
    assert list(a) == list(b)
    unset = TrainBatchSampler(labels, groups, 8, rank=1, world_size=2, seed=5, cap=25)
    a.set_epoch(0)
    assert list(unset) == list(a) and len(unset) == len(a)
    a.set_epoch(3)
    assert list(a) == list(a)  # iterating does not advance anything
    first = list(a)
    a.set_epoch(4)
    assert list(a) != first
    c = TrainBatchSampler(labels, groups, 8, rank=1, world_size=2, seed=6, cap=25)
    c.set_epoch(3)
    assert list(c) != first
    # without a cap the same images appear each epoch, but in a different order
    d = TrainBatchSampler(labels, groups, 8, seed=5)
    d.set_epoch(0)
    e0 = list(d)
    d.set_epoch(1)
    e1 = list(d)
    assert e0 != e1
    assert {frozenset(k[0] for k in b) for b in e0} != {frozenset(k[0] for k in b) for b in e1}  # new batches
    assert sorted(k[0] for b in e0 for k in b) == sorted(k[0] for b in e1 for k in b)


def test_start_batch_resumes_with_the_tail():
    labels, groups = _toy()
    s = TrainBatchSampler(labels, groups, 8, rank=2, world_size=3, seed=1, cap=30)
    s.set_epoch(7)
    full = list(s)
    assert len(full) == s.batches_per_epoch > 4
    for k in (0, 3, len(full)):
        s.set_epoch(8)  # another epoch in between: the resumed plan must be recomputed, not reused
        s.set_epoch(7, start_batch=k)
        assert len(s) == len(full) - k and s.batches_per_epoch == len(full)
        assert list(s) == full[k:]
    fresh = TrainBatchSampler(labels, groups, 8, rank=2, world_size=3, seed=1, cap=30)
    fresh.set_epoch(7, start_batch=3)  # a new process resuming mid-epoch
    assert list(fresh) == full[3:]
    for bad in (-1, len(full) + 1):
        with pytest.raises(ValueError, match="start_batch"):
            s.set_epoch(7, start_batch=bad)


def test_remainder_of_one_joins_the_previous_batch():
    groups = np.array([0] * 9 + [1] * 5 + [2] * 2 + [3] * 6)
    batches = epoch_batches(np.arange(len(groups)), groups, batch_size=4, world_size=1, seed=0, epoch=0)
    by_group = {}
    for b in batches:
        assert len(set(groups[b])) == 1
        by_group.setdefault(int(groups[b[0]]), []).append(len(b))
    assert {g: sorted(v) for g, v in by_group.items()} == {0: [4, 5], 1: [5], 2: [2], 3: [2, 4]}
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(groups)))


def test_batches_are_shuffled_across_groups():
    groups = np.repeat(np.arange(5), 40)
    orders = set()
    for epoch in range(4):
        batches = epoch_batches(np.arange(200), groups, 4, 1, seed=0, epoch=epoch)
        seq = [int(groups[b[0]]) for b in batches]
        assert seq != sorted(seq)  # not group after group
        orders.add(tuple(seq))
    assert len(orders) == 4


def test_split_largest_batch_to_fill_every_rank():
    groups = np.array([0] * 8 + [4] * 8)
    idx = np.arange(16)
    assert len(epoch_batches(idx, groups, 8, 1, 0, 0)) == 2
    three = epoch_batches(idx, groups, 8, 3, 0, 0)
    assert sorted(len(b) for b in three) == [4, 4, 8]
    assert all(len(set(groups[b])) == 1 for b in three)
    four = epoch_batches(idx, groups, 8, 4, 0, 0)
    assert sorted(len(b) for b in four) == [4, 4, 4, 4]
    assert sorted(np.concatenate(three).tolist()) == sorted(np.concatenate(four).tolist()) == list(range(16))
    # the sampler: 3 ranks, one batch each
    shares = _rank_batches(np.zeros(16, dtype=int), groups, 8, 3)
    assert [len(b) for _, b in shares] == [1, 1, 1]
    assert sorted(k[0] for _, b in shares for batch in b for k in batch) == list(range(16))


def test_split_impossible_raises():
    with pytest.raises(ValueError, match="3 images.*2"):
        epoch_batches(np.arange(3), np.zeros(3, dtype=int), 8, 2, 0, 0)
    with pytest.raises(ValueError, match="4 images.*3"):
        epoch_batches(np.arange(4), np.array([0, 0, 4, 4]), 8, 3, 0, 0)
    s = TrainBatchSampler(np.zeros(5, dtype=int), np.zeros(5, dtype=int), 4, rank=0, world_size=3)
    with pytest.raises(ValueError, match="5 images.*3"):
        s.set_epoch(0)


def test_singleton_group_is_moved_to_the_nearest_template():
    assert merge_singleton_groups(np.array([0, 3, 3, 3])).tolist() == [3, 3, 3, 3]
    assert merge_singleton_groups(np.array([1, 1, 2, 3, 3])).tolist() == [1, 1, 1, 3, 3]  # tie: lower id
    assert merge_singleton_groups(np.array([0, 4])).tolist() == [4, 4]
    assert merge_singleton_groups(np.array([0, 1, 4, 4])).tolist() == [1, 1, 4, 4]
    same = np.array([2, 2, 0, 0, 0])
    assert merge_singleton_groups(same).tolist() == same.tolist()

    groups = np.array([0] + [3] * 6 + [1] * 5)  # template 0 has one image, its nearest with images is 1
    batches = epoch_batches(np.arange(12), groups, 4, 1, 0, 0)
    home = next(b for b in batches if 0 in b)
    assert len(home) >= 2 and set(groups[home[home != 0]]) == {1}
    # templates 0 and 1 both have one image: 0 joins 1, and each key names its batch's template
    groups = np.array([0, 1] + [3] * 6)
    expected = [1, 1] + [3] * 6
    s = TrainBatchSampler(np.arange(8), groups, 4)
    for epoch in range(20):  # the moved image is first in its batch in about half of them
        s.set_epoch(epoch)
        for b in s:
            assert len(b) >= 2 and all(t == expected[i] for i, t, _ in b)


def test_too_few_images_and_bad_arguments():
    with pytest.raises(ValueError, match="1 selected"):
        epoch_batches(np.array([0]), np.zeros(3, dtype=int), 4, 1, 0, 0)
    with pytest.raises(ValueError, match="0 selected"):
        epoch_batches(np.array([], dtype=int), np.zeros(3, dtype=int), 4, 1, 0, 0)
    with pytest.raises(ValueError, match="1 image"):
        TrainBatchSampler(np.zeros(1, dtype=int), np.zeros(1, dtype=int), 4)
    capped = TrainBatchSampler(np.zeros(6, dtype=int), np.zeros(6, dtype=int), 4, cap=1)
    with pytest.raises(ValueError, match="1 selected"):  # the cap leaves a single image
        len(capped)  # planned on first use when set_epoch was never called
    labels, groups = _toy()
    for kwargs, name in [
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": -1}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"cap": 0}, "cap"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=name):
            TrainBatchSampler(labels, groups, 8, **kwargs)
    with pytest.raises(ValueError, match="batch_size"):
        TrainBatchSampler(labels, groups, 1)
    with pytest.raises(ValueError, match="groups"):
        TrainBatchSampler(labels, groups[:-1], 8)
    with pytest.raises(ValueError, match="epoch"):
        TrainBatchSampler(labels, groups, 8).set_epoch(-1)


class _KeyEcho(Dataset):
    def __getitem__(self, key):
        index, template, epoch = key
        return torch.tensor([index, template, epoch])

    def __len__(self):
        return 0


def test_works_as_a_dataloader_batch_sampler():
    labels, groups = _toy(n=60)
    sampler = TrainBatchSampler(labels, groups, 6, rank=0, world_size=2, seed=2)
    sampler.set_epoch(1)
    loader = DataLoader(_KeyEcho(), batch_sampler=sampler)
    got = [b for b in loader]
    assert len(got) == len(loader) == sampler.batches_per_epoch
    assert [b[:, 0].tolist() for b in got] == [[k[0] for k in batch] for batch in sampler]
    assert all((b[:, 2] == 1).all() and len(set(b[:, 1].tolist())) == 1 for b in got)
