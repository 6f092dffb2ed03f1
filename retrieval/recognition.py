"""Landmark recognition by soft kNN voting, and the Kaggle submission files.

Recognition as in Landmark2019 (Ozaki & Yokoo, arXiv 1906.04087, §4; the authors'
``submit_recognition.py``): each image takes the labels of its k = 3 nearest train images, every
label scores the sum of its neighbours' cosine similarities, and the best label is the prediction
with that sum as its confidence (no normalisation: a confidence lies in [-k, k]). Ties go to the
label of the nearer neighbour, as ``Counter.most_common`` does in the authors' code. (Their code
adds ``1 - ‖q - x‖²`` = ``2·cos - 1`` per neighbour; the plain cosine sum is used here.)

Submission files (Google Landmark Retrieval / Recognition 2019 on Kaggle), CSV with a header:

- retrieval: ``id,images``, ``images`` = up to 100 space-separated index ids, best first;
- recognition: ``id,landmarks``, ``landmarks`` = ``"<landmark_id> <score>"`` or empty.

Writers go through a ``.tmp`` file, validate it and rename it only when it passes, so a failed
write leaves no new file. Validators raise ``ValueError`` with one line naming the file and line.
Ids are compared as strings, since that is what the files hold.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from retrieval.features import tmp_path
from retrieval.search import knn

__all__ = ["MAX_IMAGES", "RECOGNITION_FILE", "RETRIEVAL_FILE", "knn_vote", "no_label", "read_recognition_submission",
           "read_retrieval_submission", "validate_recognition_submission", "validate_retrieval_submission",
           "write_recognition_submission", "write_retrieval_submission"]

MAX_IMAGES = 100
RETRIEVAL_HEADER = ("id", "images")
RECOGNITION_HEADER = ("id", "landmarks")
RETRIEVAL_FILE = "retrieval_submission.csv"
RECOGNITION_FILE = "recognition_submission.csv"


def no_label(labels: np.ndarray) -> np.ndarray:
    """True where a label means "no prediction": -1 in integer arrays, None, "" or NaN otherwise."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        return labels == -1
    if labels.dtype.kind == "f":
        return np.isnan(labels)
    if labels.dtype.kind in "US":
        return labels == labels.dtype.type()
    return np.array([x is None or (isinstance(x, (str, bytes)) and not x) or (isinstance(x, float) and math.isnan(x))
                     for x in labels.tolist()], dtype=bool).reshape(labels.shape)


def _soft_vote(sims: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row the label code with the largest similarity sum and that sum; ties to the nearer neighbour's label."""
    n, k = codes.shape
    best = np.empty(n, np.int64)
    conf = np.empty(n, np.float32)
    block = max(1, 2**22 // (k * k))  # bounds the (rows, k, k) label-agreement array
    for s in range(0, n, block):
        c, sim = codes[s:s + block], sims[s:s + block]
        sums = ((c[:, :, None] == c[:, None, :]) * sim[:, None, :]).sum(axis=2)
        # argmax takes the first maximum: the tied label whose neighbour ranks highest.
        col = np.argmax(sums, axis=1)
        rows = np.arange(len(c))
        best[s:s + block], conf[s:s + block] = c[rows, col], sums[rows, col]
    return best, conf


def knn_vote(feats: np.ndarray, train_feats: np.ndarray, train_labels: np.ndarray, k: int = 3, *,
             exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each row's predicted label and confidence by soft voting over its ``k`` nearest train vectors.

    A label's score is the sum of the cosine similarities of the neighbours carrying it; the
    prediction is the best label (ties: the one whose neighbour is nearer), the confidence its
    score. Returns ``(labels, confidences)``, ``(N,)`` each, labels in ``train_labels``' dtype.
    ``exclude_self``: ``feats`` are the train vectors themselves; each row's own entry is left out
    (leave-one-out). Fewer than ``k`` train vectors vote with all of them.
    """
    train_labels = np.asarray(train_labels)
    if train_labels.ndim != 1 or len(train_labels) != len(train_feats):
        raise ValueError(f"train_labels must be ({len(train_feats)},), one per train vector, got {train_labels.shape}")
    if k < 1:
        raise ValueError(f"knn_vote: k must be >= 1, got {k}")
    if exclude_self and len(feats) != len(train_feats):
        raise ValueError(f"exclude_self needs feats to be the train vectors: {len(feats)} rows vs {len(train_feats)}")
    sims, ids = knn(feats, train_feats, k + int(exclude_self))
    if exclude_self:
        # Move each row's own entry to the end (ties can put it anywhere) and drop at least one column.
        own = ids == np.arange(len(ids))[:, None]
        order = np.argsort(own, axis=1, kind="stable")[:, :min(k, ids.shape[1] - 1)]
        sims, ids = np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)
    if ids.shape[1] == 0:
        raise ValueError("knn_vote: no train vectors to vote with")
    vocab, codes = np.unique(train_labels, return_inverse=True)
    best, conf = _soft_vote(sims, codes.reshape(-1)[ids])
    return vocab[best], conf


# ---------------------------------------------------------------------------------------------------------------------
# Submission files
# ---------------------------------------------------------------------------------------------------------------------


def _read_rows(path: Path, header: tuple[str, str], shown: Path) -> list[tuple[int, str, str]]:
    """``(line, id, value)`` rows of a two-column submission file, its header and id uniqueness checked."""
    if not path.is_file():
        raise FileNotFoundError(f"submission file not found: {shown}")
    rows = []
    first_line: dict[str, int] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is None or tuple(first) != header:
            raise ValueError(f"{shown}: header must be {','.join(header)!r}, got {','.join(first or [])!r}")
        for row in reader:
            line = reader.line_num
            if len(row) != 2:
                raise ValueError(f"{shown}, line {line}: expected 2 columns ({','.join(header)}), got {len(row)}")
            if row[0] in first_line:
                raise ValueError(f"{shown}, line {line}: duplicate id {row[0]!r} (first on line {first_line[row[0]]})")
            first_line[row[0]] = line
            rows.append((line, row[0], row[1]))
    return rows


def _parse_retrieval(path: Path, shown: Path) -> dict[str, tuple[int, list[str]]]:
    out = {}
    for line, qid, value in _read_rows(path, RETRIEVAL_HEADER, shown):
        images = value.split()
        if len(images) > MAX_IMAGES:
            raise ValueError(f"{shown}, line {line} (id {qid!r}): {len(images)} images, at most {MAX_IMAGES} allowed")
        if len(set(images)) != len(images):
            dup = next(i for n, i in enumerate(images) if i in images[:n])
            raise ValueError(f"{shown}, line {line} (id {qid!r}): index id {dup!r} appears twice")
        out[qid] = (line, images)
    return out


def _parse_recognition(path: Path, shown: Path) -> dict[str, tuple[int, tuple[str, float] | None]]:
    out: dict[str, tuple[int, tuple[str, float] | None]] = {}
    for line, qid, value in _read_rows(path, RECOGNITION_HEADER, shown):
        parts = value.split()
        if not parts:
            out[qid] = (line, None)
            continue
        if len(parts) != 2:
            raise ValueError(f"{shown}, line {line} (id {qid!r}): landmarks must be '<landmark_id> <score>', "
                             f"got {value!r}")
        try:
            score = float(parts[1])
        except ValueError:
            raise ValueError(f"{shown}, line {line} (id {qid!r}): unparseable score {parts[1]!r}") from None
        if not math.isfinite(score):
            raise ValueError(f"{shown}, line {line} (id {qid!r}): score must be finite, got {parts[1]!r}")
        out[qid] = (line, (parts[0], score))
    return out


def _expected_ids(test_ids: Iterable, shown: Path) -> list[str]:
    ids = [str(t) for t in test_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{shown}: the test ids given to check against contain duplicates")
    return ids


def _check_rows(rows: dict[str, tuple[int, object]], test_ids: Iterable, shown: Path) -> None:
    """Every test id has exactly one row (duplicates were caught when reading) and no other id has one."""
    expected = _expected_ids(test_ids, shown)
    known = set(expected)
    for qid, (line, _) in rows.items():
        if qid not in known:
            raise ValueError(f"{shown}, line {line}: unknown test id {qid!r}")
    missing = [t for t in expected if t not in rows]
    if missing:
        raise ValueError(f"{shown}: {len(missing)} of {len(expected)} test ids have no row, first {missing[0]!r}")


def _check_retrieval(path: Path, shown: Path, test_ids: Iterable, index_ids: Iterable) -> None:
    rows = _parse_retrieval(path, shown)
    _check_rows(rows, test_ids, shown)
    known = {str(i) for i in index_ids}
    for qid, (line, images) in rows.items():
        unknown = next((i for i in images if i not in known), None)
        if unknown is not None:
            raise ValueError(f"{shown}, line {line} (id {qid!r}): unknown index id {unknown!r}")


def _check_recognition(path: Path, shown: Path, test_ids: Iterable, known_labels: Iterable | None) -> None:
    rows = _parse_recognition(path, shown)
    _check_rows(rows, test_ids, shown)
    if known_labels is None:
        return
    known = {str(label) for label in known_labels}
    for qid, (line, pred) in rows.items():
        if pred is not None and pred[0] not in known:
            raise ValueError(f"{shown}, line {line} (id {qid!r}): unknown landmark id {pred[0]!r}")


def validate_retrieval_submission(path: str | os.PathLike, test_ids: Sequence, index_ids: Sequence) -> None:
    """Check a retrieval submission: header, each test id once, ≤ 100 distinct known index ids per row."""
    _check_retrieval(Path(path), Path(path), test_ids, index_ids)


def validate_recognition_submission(path: str | os.PathLike, test_ids: Sequence,
                                    known_labels: Sequence | None = None) -> None:
    """Check a recognition submission: header, each test id once, ``"<landmark_id> <score>"`` or empty.

    With ``known_labels``, every predicted landmark id must be one of them.
    """
    _check_recognition(Path(path), Path(path), test_ids, known_labels)


def read_retrieval_submission(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{test id: [index ids, best first]}`` of a retrieval submission (format checked, ids not)."""
    return {qid: images for qid, (_, images) in _parse_retrieval(Path(path), Path(path)).items()}


def read_recognition_submission(path: str | os.PathLike) -> dict[str, tuple[str, float] | None]:
    """``{test id: (landmark id, score) or None}`` of a recognition submission (format checked, ids not)."""
    return {qid: pred for qid, (_, pred) in _parse_recognition(Path(path), Path(path)).items()}


def _write_checked(path: str | os.PathLike, header: tuple[str, str], rows: Iterable[tuple[str, str]],
                   check: Callable[[Path, Path], None]) -> Path:
    """Write to ``<path>.tmp``, run ``check(tmp, path)`` on it, rename; the tmp file goes on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        check(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def write_retrieval_submission(path: str | os.PathLike, test_ids: Sequence, index_ids: Sequence, ranks: np.ndarray,
                               k: int = MAX_IMAGES) -> Path:
    """Write the retrieval submission: row i lists ``index_ids[ranks[i, :k]]`` (-1 entries skipped)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or len(ranks) != len(test_ids) or ranks.dtype.kind not in "iu":
        raise ValueError(f"{path}: ranks must be an integer (Q, k) array, Q = {len(test_ids)}, got "
                         f"{ranks.dtype} {ranks.shape}")
    if not 1 <= k <= MAX_IMAGES:
        raise ValueError(f"{path}: k must be in 1..{MAX_IMAGES}, got {k}")
    if ranks.size and ranks.max() >= len(index_ids):
        raise ValueError(f"{path}: ranks hold index {ranks.max()}, but there are only {len(index_ids)} index ids")
    names = np.array([str(i) for i in index_ids], dtype=object)
    rows = ((str(qid), " ".join(names[row[row >= 0]])) for qid, row in zip(test_ids, ranks[:, :k], strict=True))
    return _write_checked(path, RETRIEVAL_HEADER, rows,
                          lambda tmp, shown: _check_retrieval(tmp, shown, test_ids, index_ids))


def write_recognition_submission(path: str | os.PathLike, test_ids: Sequence, labels: np.ndarray,
                                 confidences: np.ndarray, known_labels: Sequence | None = None) -> Path:
    """Write the recognition submission: ``"<label> <confidence>"`` per test id, empty where ``no_label``."""
    labels, confidences = np.asarray(labels), np.asarray(confidences, np.float64)
    if labels.shape != (len(test_ids),) or confidences.shape != (len(test_ids),):
        raise ValueError(f"{path}: labels {labels.shape} and confidences {confidences.shape} must be "
                         f"({len(test_ids)},), one per test id")
    missing = no_label(labels)
    # repr() of a float is the shortest text that reads back to the same float.
    rows = ((str(qid), "" if miss else f"{label} {float(c)!r}")
            for qid, label, c, miss in zip(test_ids, labels.tolist(), confidences, missing, strict=True))
    return _write_checked(path, RECOGNITION_HEADER, rows,
                          lambda tmp, shown: _check_recognition(tmp, shown, test_ids, known_labels))
