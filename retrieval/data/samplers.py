"""Batch plans for distributed training of embeddings: size templates, class caps, DDP shares.

Landmark2019 (arXiv 1906.04087, lyakaap's 1st-place solution) trains on whole images resized
to one of a few (width, height) *size templates* picked by aspect ratio, so every batch is one
tensor without cropping. One epoch's plan is made in three pure steps:

1. `class_balanced_indices`: each class keeps at most ``cap`` images, a fresh random subset
   every epoch (GLDv2's head classes hold thousands of images, its tail a handful);
2. `merge_singleton_groups`: a template with a single image this epoch hands it to the nearest
   template that has images (templates are ordered by aspect ratio, so that is the closest shape);
3. `epoch_batches`: images are shuffled within their template, cut into batches, the batches
   shuffled, and the largest batch halved until the count divides by ``world_size``.

Guarantees, for any (seed, epoch), on every rank, without communication:

- the plan is a function of (labels, groups, batch_size, world_size, cap, seed, epoch) only;
- every batch holds one template and at least 2 images (BatchNorm never sees a batch of 1);
- every selected image is in exactly one batch, and the number of batches is a multiple of
  ``world_size``: rank ``r`` takes ``batches[r::world_size]``, so ranks are disjoint, their union
  is the epoch, and every rank runs the same number of steps (DDP never waits on a missing rank).

With several sources (multi-domain training, ``domains`` + ``domain_weights``), step 1 is followed
by `weighted_selection`: each source contributes ``weight × its images`` this epoch (a fractional
part drawn at random, whole parts as repeats). A repeat ``r`` of image ``i`` is the distinct
virtual index ``r·N + i``, so the steps after it and their guarantees are unchanged.

`TrainBatchSampler` wraps this for ``DataLoader(batch_sampler=...)``. It yields keys
``(index, template_id, epoch)`` (``(index, template_id, epoch, repeat)`` for a repeat): the dataset
resizes to the template and seeds augmentation from (seed, epoch, index[, repeat]), so the data
never depends on worker processes, and ``set_epoch(epoch, start_batch)`` resumes a killed run
mid-epoch with exactly the batches it had left.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

Template = tuple[int, int]  # (width, height) in pixels

SIZE_TEMPLATES: dict[str, tuple[Template, ...]] = {
    # Landmark2019 (lyakaap), ordered landscape → portrait; SS2 is their training set
    "SS2": ((480, 320), (480, 352), (384, 384), (352, 480), (320, 480)),
    "S2": ((512, 352), (512, 384), (448, 448), (384, 512), (352, 512)),
    "SM2": ((736, 512), (704, 544), (608, 608), (544, 704), (512, 736)),
    # their last "scale-up" epoch
    "M2": ((800, 544), (800, 608), (704, 704), (608, 800), (544, 800)),
    # their extraction templates (``predict --scale``): three or five aspect buckets
    "S": ((512, 384), (448, 448), (384, 512)),
    "M": ((800, 608), (704, 704), (608, 800)),
    "L": ((800, 608), (800, 800), (608, 800)),
    "L2": ((800, 544), (800, 608), (800, 800), (608, 800), (544, 800)),
}

# Stream ids for np.random.default_rng([seed, epoch, stream]); above any image index, so they
# never collide with the augmentation streams [seed, epoch, index] of retrieval.data.augment.
_CAP_STREAM = 0x43415031  # "CAP1"
_WEIGHT_STREAM = 0x57475431  # "WGT1"
_BATCH_STREAM = 0x42415431  # "BAT1"


def _check_seed(seed: int, epoch: int) -> None:
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if int(epoch) < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")


def resolve_templates(spec: str | Sequence[Sequence[int]]) -> tuple[Template, ...]:
    """A template set by name (see `SIZE_TEMPLATES`) or an explicit sequence of (width, height) pairs."""
    if isinstance(spec, str):
        if spec not in SIZE_TEMPLATES:
            raise ValueError(f"unknown size templates {spec!r}; expected one of {sorted(SIZE_TEMPLATES)} "
                             f"or a sequence of (width, height) pairs")
        return SIZE_TEMPLATES[spec]
    try:
        pairs = [tuple(p) for p in spec]
    except TypeError:
        raise ValueError(f"size templates {spec!r}: expected a name or a sequence of (width, height) pairs") from None
    if not pairs:
        raise ValueError("size templates: empty sequence")
    out = []
    for p in pairs:
        ok = len(p) == 2 and all(
            not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer, np.floating))
            and float(v).is_integer() and v > 0 for v in p)
        if not ok:
            raise ValueError(f"size templates {spec!r}: {p!r} is not a (width, height) pair of positive integers")
        out.append((int(p[0]), int(p[1])))
    return tuple(out)


def scale_templates(templates: str | Sequence[Sequence[int]], factor: float,
                    multiple: int = 32) -> tuple[Template, ...]:
    """Templates scaled by ``factor``, each side rounded (half up) to a multiple of ``multiple`` (at least one)."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    if int(multiple) < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    m = int(multiple)

    def side(v: int) -> int:
        return max(m, int(np.floor(v * factor / m + 0.5)) * m)

    return tuple((side(w), side(h)) for w, h in resolve_templates(templates))


def assign_templates(sizes: np.ndarray, templates: str | Sequence[Sequence[int]]) -> np.ndarray:
    """Template id per image, ``(N,)`` int64: the nearest aspect ratio h/w in log space.

    ``sizes`` is ``(N, 2)`` (width, height). Unknown sizes (a side <= 0 or not finite) go to the most
    square template. Ties go to the lower-ratio template.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"sizes must be (N, 2) of (width, height), got shape {sizes.shape}")
    tpl = np.asarray(resolve_templates(templates), dtype=np.float64)
    t_ratio = np.log(tpl[:, 1]) - np.log(tpl[:, 0])
    # unique ratios in ascending order, each mapped to its first template; nearest = between midpoints
    uniq, first = np.unique(t_ratio, return_index=True)
    mids = (uniq[1:] + uniq[:-1]) / 2
    w, h = sizes[:, 0], sizes[:, 1]
    valid = np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0)
    out = np.full(len(sizes), int(np.argmin(np.abs(t_ratio))), dtype=np.int64)
    ratio = np.log(h[valid]) - np.log(w[valid])
    out[valid] = first[np.searchsorted(mids, ratio, side="left")]
    return out


def class_balanced_indices(labels: np.ndarray, cap: int | None, seed: int, epoch: int) -> np.ndarray:
    """Sorted indices of this epoch's images: at most ``cap`` per class, a fresh random subset each epoch.

    ``cap=None`` keeps every image. Vectorised (one sort of packed int64 keys, no loop over classes), so
    a 4M-image GLDv2 epoch takes well under a second.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    _check_seed(seed, epoch)
    n = len(labels)
    if cap is None:
        return np.arange(n, dtype=np.int64)
    if int(cap) < 1:
        raise ValueError(f"cap must be >= 1 or None, got {cap}")
    if n == 0:
        return np.arange(0, dtype=np.int64)
    if n >= 2**31:
        raise ValueError(f"class_balanced_indices: {n} images; at most 2**31 - 1 fit the packed sort key")
    lab = labels.astype(np.int64) - labels.min()
    if lab.max() >= n:  # sparse ids (e.g. raw landmark ids): compact them so the packed key below fits
        lab = np.unique(lab, return_inverse=True)[1].reshape(-1)
    ibits, lbits = int(n - 1).bit_length(), int(lab.max()).bit_length()
    kbits = 63 - ibits - lbits  # >= 1 as lab < n <= 2**31
    # one int64 per image, (label | random key | index): a plain sort groups classes in random order,
    # and the values are unique, so the result does not depend on the sort algorithm (rare key ties go by index)
    rng = np.random.default_rng([int(seed), int(epoch), _CAP_STREAM])
    packed = (lab << (kbits + ibits)) | (rng.integers(0, 1 << kbits, n, dtype=np.int64) << ibits) | np.arange(n)
    packed.sort()
    sorted_labels = packed >> (kbits + ibits)
    pos = np.arange(n)
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    rank = pos - np.maximum.accumulate(np.where(starts, pos, 0))  # position within the class
    keep = np.zeros(n, dtype=bool)
    keep[packed[rank < int(cap)] & ((1 << ibits) - 1)] = True
    return np.flatnonzero(keep).astype(np.int64, copy=False)


def weighted_selection(indices: np.ndarray, domains: np.ndarray, weights: Sequence[float], seed: int,
                       epoch: int) -> np.ndarray:
    """This epoch's images of each source, ``weight`` times as many as it has in ``indices``.

    ``domains[i]`` is the source of image ``i`` (indexed by image, ``N = len(domains)``); source ``d``
    contributes ``floor(w_d)`` full copies of its selected images plus a random ``frac(w_d)`` of them,
    copy ``r`` of image ``i`` as the virtual index ``r·N + i``. Returns sorted distinct int64 indices.
    """
    domains = np.asarray(domains, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    _check_seed(seed, epoch)
    if len(weights) <= (domains.max() if len(domains) else -1) or any(float(w) < 0 for w in weights):
        raise ValueError(f"weights: one non-negative weight per source needed, got {list(weights)}")
    n = len(domains)
    rng = np.random.default_rng([int(seed), int(epoch), _WEIGHT_STREAM])
    parts = []
    for d, w in enumerate(weights):
        members = indices[domains[indices] == d]
        whole, frac = divmod(float(w), 1.0)
        parts += [members + r * n for r in range(int(whole))]
        k = round(frac * len(members))
        if k:
            parts.append(np.sort(rng.choice(members, size=k, replace=False)) + int(whole) * n)
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def merge_singleton_groups(groups: np.ndarray) -> np.ndarray:
    """Group ids with no group of exactly one image: a lone image joins the nearest group id that has images.

    Groups are taken in ascending id; ties in distance go to the lower id. Returns a new array;
    idempotent, and unchanged when no group is a singleton (or all images are one singleton).
    """
    groups = np.asarray(groups, dtype=np.int64)
    if groups.ndim != 1:
        raise ValueError(f"groups must be 1-D, got shape {groups.shape}")
    if len(groups) and groups.min() < 0:
        raise ValueError("groups must be >= 0 (template ids)")
    counts = np.bincount(groups)  # template ids are small
    if np.count_nonzero(counts) < 2 or not (counts == 1).any():
        return groups.copy()
    out = groups.copy()
    count = {g: int(counts[g]) for g in np.flatnonzero(counts).tolist()}
    for g in np.flatnonzero(counts == 1).tolist():  # a handful of templates, not classes
        if count[g] != 1:
            continue  # another singleton has joined it
        others = [k for k, c in count.items() if c > 0 and k != g]
        target = min(others, key=lambda k: (abs(k - g), k))
        out[out == g] = target
        count[target] += 1
        count[g] = 0
    return out


def epoch_batches(indices: np.ndarray, groups: np.ndarray, batch_size: int, world_size: int, seed: int,
                  epoch: int) -> list[np.ndarray]:
    """The global batch plan of one epoch (the same on every rank): rank ``r`` takes ``batches[r::world_size]``.

    ``indices`` are the selected (distinct) images, ``groups[i]`` the template id of image ``i`` (indexed by image,
    not by position in ``indices``). Batches hold one template (after `merge_singleton_groups`) and at
    least 2 images; a remainder of 1 joins the group's previous batch (batch_size + 1). The batch order
    is random, and the largest batch is halved until the count is a multiple of ``world_size``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if indices.ndim != 1 or groups.ndim != 1:
        raise ValueError("indices and groups must be 1-D")
    if int(batch_size) < 2:
        raise ValueError(f"batch_size must be >= 2, got {batch_size}")
    if int(world_size) < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    _check_seed(seed, epoch)
    n = len(indices)
    if n < 2:
        raise ValueError(f"epoch_batches: {n} selected image(s); need at least 2 for a batch")
    if indices.min() < 0 or indices.max() >= len(groups):
        raise ValueError(f"indices outside 0..{len(groups) - 1} (the length of groups)")
    bs, ws = int(batch_size), int(world_size)
    g = merge_singleton_groups(groups[indices])
    rng = np.random.default_rng([int(seed), int(epoch), _BATCH_STREAM])
    perm = rng.permutation(n)
    gp = g[perm].astype(np.int16) if g.max() < 2**15 else g[perm]  # small ints: numpy's stable sort is a radix sort
    perm = perm[np.argsort(gp, kind="stable")]  # grouped by template, random within template
    bounds = np.flatnonzero(np.diff(g[perm])) + 1
    batches: list[np.ndarray] = []
    for members in np.split(indices[perm], bounds):
        cuts = list(range(bs, len(members), bs))
        if len(members) - (cuts[-1] if cuts else 0) == 1:
            cuts.pop()  # a remainder of 1 joins the previous batch
        batches.extend(np.split(members, cuts))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    while len(batches) % ws:
        sizes = [len(b) for b in batches]
        big = int(np.argmax(sizes))
        if sizes[big] < 4:
            raise ValueError(f"epoch_batches: {n} images cannot make a multiple of {ws} batches of >= 2 images "
                             f"({len(batches)} batches, the largest of {sizes[big]}); use fewer ranks or more images")
        half = sizes[big] // 2
        b = batches[big]
        batches[big:big + 1] = [b[:half], b[half:]]
    return batches


class TrainBatchSampler(Sampler):
    """Batches of keys ``(index, template_id, epoch)`` for this rank, for ``DataLoader(batch_sampler=...)``.

    Call ``set_epoch(epoch)`` before each epoch, as with ``DistributedSampler`` (without it the plan is
    epoch 0's); that makes the plan, about a second at GLDv2 scale. ``set_epoch(epoch, start_batch=k)``
    skips the ``k`` batches this rank already consumed in that epoch. Iterating does not advance
    anything: the same (epoch, start_batch) always yields the same batches.
    """

    def __init__(self, labels: np.ndarray, groups: np.ndarray, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, cap: int | None = None, domains: np.ndarray | None = None,
                 domain_weights: Sequence[float] | None = None) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.groups = np.asarray(groups, dtype=np.int64)
        if self.labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {self.labels.shape}")
        if self.groups.shape != self.labels.shape:
            raise ValueError(f"groups must have one template id per image: {len(self.labels)} labels, "
                             f"{len(self.groups)} groups")
        if len(self.groups) and self.groups.min() < 0:
            raise ValueError("groups must be >= 0 (template ids)")
        if int(batch_size) < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        if int(world_size) < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in 0..{int(world_size) - 1}, got {rank}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if cap is not None and int(cap) < 1:
            raise ValueError(f"cap must be >= 1 or None, got {cap}")
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed = int(seed)
        self.cap = None if cap is None else int(cap)
        if len(self.labels) < 2:
            raise ValueError(f"TrainBatchSampler: {len(self.labels)} image(s); need at least 2 for a batch")
        if (domains is None) != (domain_weights is None):
            raise ValueError("domains and domain_weights go together")
        self.domains = None if domains is None else np.asarray(domains, dtype=np.int64)
        if self.domains is not None and self.domains.shape != self.labels.shape:
            raise ValueError(f"domains must have one source per image: {len(self.labels)} labels, "
                             f"{len(self.domains)} domains")
        self.domain_weights = None if domain_weights is None else [float(w) for w in domain_weights]
        self.epoch: int | None = None  # planned by set_epoch (or epoch 0 on first use): one plan per epoch
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Plan ``epoch``; iteration starts after the ``start_batch`` batches this rank already consumed."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        epoch = int(epoch)
        if self.epoch != epoch:
            sel = class_balanced_indices(self.labels, self.cap, self.seed, epoch)
            groups = self.groups
            if self.domains is not None:  # virtual indices r·N + i for the repeats
                sel = weighted_selection(sel, self.domains, self.domain_weights, self.seed, epoch)
                groups = np.tile(self.groups, int(sel.max()) // len(self.labels) + 1 if len(sel) else 1)
            eff = groups.copy()
            eff[sel] = merge_singleton_groups(groups[sel])  # lone images' batches use their new template
            plan = epoch_batches(sel, eff, self.batch_size, self.world_size, self.seed, epoch)
            self._batches = plan[self.rank::self.world_size]
            self._templates = [int(eff[b[0]]) for b in self._batches]
            self.epoch = epoch
        if not 0 <= int(start_batch) <= len(self._batches):
            raise ValueError(f"start_batch must be in 0..{len(self._batches)} (batches of rank {self.rank} "
                             f"in epoch {epoch}), got {start_batch}")
        self.start_batch = int(start_batch)

    def _planned(self) -> None:
        if self.epoch is None:
            self.set_epoch(0)

    @property
    def batches_per_epoch(self) -> int:
        """Batches of this rank in a full epoch (the same on every rank)."""
        self._planned()
        return len(self._batches)

    def __len__(self) -> int:
        self._planned()
        return len(self._batches) - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        self._planned()
        epoch, n = self.epoch, len(self.labels)
        for batch, template in zip(self._batches[self.start_batch:], self._templates[self.start_batch:], strict=True):
            yield [(i, template, epoch) if i < n else (i % n, template, epoch, i // n) for i in batch.tolist()]
