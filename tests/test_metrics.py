"""Tests for retrieval.metrics (revisitop mAP/mP@k, GLDv2 mAP@100, GUIE mP@5)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from retrieval.metrics import gldv2_map_at_k, guie_mp_at_k, map_at_k, revisitop_map

GND_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop"
KAPPAS = (1, 5, 10)
PROTOCOLS = ("easy", "medium", "hard")


# --------------------------------------------------------------------------------------------------
# Loop reference: a plain, query-major transcription of revisitop's compute_map definition.
# --------------------------------------------------------------------------------------------------


def _protocol_lists(g: dict, protocol: str) -> tuple[list[int], list[int]]:
    easy, hard, junk = list(g["easy"]), list(g["hard"]), list(g["junk"])
    if protocol == "easy":
        return easy, junk + hard
    if protocol == "medium":
        return easy + hard, junk
    return hard, junk + easy


def _ref_query(ranked, positives: list[int], ignored: list[int], kappas) -> tuple[float, list[float]]:
    """AP and P@k of one query, or (nan, [nan...]) when it has no positives."""
    if len(positives) == 0:
        return math.nan, [math.nan] * len(kappas)
    pos_set, ign_set = set(positives), set(ignored)
    positions = []  # 0-based positions of positives after removing ignored images
    n_ignored_before = 0
    for idx, db in enumerate(ranked):
        db = int(db)
        if db in pos_set:
            positions.append(idx - n_ignored_before)
        if db in ign_set:  # revisitop counts an ignored image only for positives strictly after it
            n_ignored_before += 1
    ap = 0.0
    for j, r in enumerate(positions):
        precision_0 = 1.0 if r == 0 else j / r
        precision_1 = (j + 1) / (r + 1)
        ap += (precision_0 + precision_1) / 2 / len(positives)
    precs = []
    for k in kappas:
        if not positions:  # documented rule for truncated lists without any retrieved positive
            precs.append(0.0)
            continue
        pos1 = [p + 1 for p in positions]
        kq = min(max(pos1), k)
        precs.append(sum(1 for p in pos1 if p <= kq) / kq)
    return ap, precs


def reference_map(ranks, gnd, kappas=KAPPAS) -> dict:
    out = {}
    for protocol in PROTOCOLS:
        aps, prs = [], []
        for i, g in enumerate(gnd):
            positives, ignored = _protocol_lists(g, protocol)
            ap, precs = _ref_query(ranks[i], positives, ignored, kappas)
            aps.append(ap)
            prs.append(precs)
        valid = [i for i, a in enumerate(aps) if not math.isnan(a)]
        res = {"map": sum(aps[i] for i in valid) / len(valid), "aps": np.array(aps)}
        for t, k in enumerate(kappas):
            res[f"mp@{k}"] = sum(prs[i][t] for i in valid) / len(valid)
        out[protocol] = res
    return out


def assert_matches_reference(got: dict, ref: dict, kappas=KAPPAS) -> None:
    for protocol in PROTOCOLS:
        assert got[protocol]["map"] == pytest.approx(ref[protocol]["map"], abs=1e-6), protocol
        for k in kappas:
            key = f"mp@{k}"
            assert got[protocol][key] == pytest.approx(ref[protocol][key], abs=1e-6), (protocol, key)
        np.testing.assert_allclose(got[protocol]["aps"], ref[protocol]["aps"], atol=1e-6, equal_nan=True)


def random_gnd(rng: np.random.Generator, n_db: int, n_queries: int, overlap: bool = False) -> list[dict]:
    gnd = []
    for q in range(n_queries):
        perm = rng.permutation(n_db)
        n_easy = 0 if q % 4 == 0 else int(rng.integers(1, 8))  # every 4th query: empty easy
        n_hard = 0 if q % 5 == 1 else int(rng.integers(1, 8))  # some queries: empty hard
        n_junk = int(rng.integers(0, 6))
        easy = perm[:n_easy]
        hard = perm[n_easy : n_easy + n_hard]
        junk = perm[n_easy + n_hard : n_easy + n_hard + n_junk]
        if overlap and n_easy and n_junk:  # beyond the real data: an image both easy and junk
            junk = np.append(junk, easy[0])
        gnd.append({"easy": easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist()})
    return gnd


def random_ranks(rng: np.random.Generator, n_db: int, n_queries: int, top: int | None = None) -> np.ndarray:
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_queries)])
    return ranks if top is None else ranks[:, :top]


# --------------------------------------------------------------------------------------------------
# revisitop_map: hand-worked cases
# --------------------------------------------------------------------------------------------------


def test_positives_at_ranks_0_and_2_of_4():
    # ranking [10, 11, 12, 13], easy positives {10, 12}; nothing ignored, 2 positives.
    # j=0 at r=0: p0 = 1, p1 = 1/1            -> trapezoid (1 + 1)/2     = 1
    # j=1 at r=2: p0 = 1/2, p1 = 2/3          -> trapezoid (1/2 + 2/3)/2 = 7/12
    # AP = (1 + 7/12) / 2 = 19/24
    # P@k with 1-based positions [1, 3]: k=1 -> kq=min(3,1)=1, 1/1; k=5 -> kq=min(3,5)=3, 2/3; k=10 -> 2/3
    ranks = np.array([[10, 11, 12, 13]])
    gnd = [{"easy": [10, 12], "hard": [], "junk": []}]
    res = revisitop_map(ranks, gnd)
    for protocol in ("easy", "medium"):
        assert res[protocol]["map"] == pytest.approx(19 / 24)
        assert res[protocol]["mp@1"] == pytest.approx(1.0)
        assert res[protocol]["mp@5"] == pytest.approx(2 / 3)
        assert res[protocol]["mp@10"] == pytest.approx(2 / 3)
    # no hard positives: the only query is skipped -> NaN everywhere in the hard protocol
    assert np.isnan(res["hard"]["aps"][0])
    assert math.isnan(res["hard"]["map"])
    assert set(res["easy"]) == {"map", "mp@1", "mp@5", "mp@10", "aps"}
    assert isinstance(res["easy"]["map"], float)


def test_junk_before_positive_moves_it_up():
    # ranking [7 (junk), 3 (positive), 5, 6]; junk removed -> positive at r=0 -> AP = 1, P@1 = 1.
    # (Without removal it would be r=1: p0 = 0/1, p1 = 1/2 -> AP = 1/4.)
    ranks = np.array([[7, 3, 5, 6]])
    gnd = [{"easy": [3], "hard": [], "junk": [7]}]
    res = revisitop_map(ranks, gnd)
    assert res["easy"]["map"] == pytest.approx(1.0)
    assert res["easy"]["mp@1"] == pytest.approx(1.0)
    # the same ranking with 7 not declared junk
    res = revisitop_map(ranks, [{"easy": [3], "hard": [], "junk": []}])
    assert res["easy"]["map"] == pytest.approx(0.25)
    assert res["easy"]["mp@1"] == pytest.approx(0.0)  # kq = min(2, 1) = 1, no positive at position 1


def test_three_protocols_hand_worked():
    # ranking [h, e1, x, e2] = [0, 1, 2, 3]; easy {1, 3}, hard {0}, no junk.
    # Easy:   h ignored -> e1 at r=0, e2 at r=3-1=2   -> AP = 19/24 (as above); P@5: pos [1,3] -> 2/3
    # Medium: positives at r = 0, 1, 3 (3 positives)
    #         j=0 r=0: (1 + 1)/2 = 1; j=1 r=1: (1/1 + 2/2)/2 = 1; j=2 r=3: (2/3 + 3/4)/2 = 17/24
    #         AP = (1 + 1 + 17/24)/3 = 65/72; P@1 = 1; P@5: pos [1,2,4], kq = 4 -> 3/4; P@10 = 3/4
    # Hard:   e1, e2 ignored -> h at r=0 -> AP = 1
    ranks = np.array([[0, 1, 2, 3]])
    gnd = [{"easy": [1, 3], "hard": [0], "junk": []}]
    res = revisitop_map(ranks, gnd)
    assert res["easy"]["map"] == pytest.approx(19 / 24)
    assert res["easy"]["mp@5"] == pytest.approx(2 / 3)
    assert res["medium"]["map"] == pytest.approx(65 / 72)
    assert res["medium"]["mp@1"] == pytest.approx(1.0)
    assert res["medium"]["mp@5"] == pytest.approx(3 / 4)
    assert res["medium"]["mp@10"] == pytest.approx(3 / 4)
    assert res["hard"]["map"] == pytest.approx(1.0)
    assert res["hard"]["mp@5"] == pytest.approx(1.0)


def test_mp_at_k_normalised_by_last_positive_position():
    # positives at 1-based positions [1, 2] of 20: revisitop's P@10 uses kq = min(2, 10) = 2 -> 2/2 = 1,
    # not 2/10.
    ranks = np.arange(20)[None, :]
    res = revisitop_map(ranks, [{"easy": [0, 1], "hard": [], "junk": []}], kappas=(1, 10))
    assert res["easy"]["mp@10"] == pytest.approx(1.0)
    # positives at positions [1, 12]: k=10 -> kq = 10, one positive within -> 1/10
    res = revisitop_map(ranks, [{"easy": [0, 11], "hard": [], "junk": []}], kappas=(1, 10))
    assert res["easy"]["mp@10"] == pytest.approx(0.1)


def test_truncated_ranking():
    # top-2 list [9, 4]; 3 positives {4, 5, 6}: only 4 retrieved, at r=1 (j=0)
    # AP = (0/1 + 1/2)/2 / 3 = 1/12; P@1: kq = min(2,1) = 1 -> 0; P@5: kq = min(2,5) = 2 -> 1/2
    res = revisitop_map(np.array([[9, 4]]), [{"easy": [4, 5, 6], "hard": [], "junk": []}])
    assert res["easy"]["map"] == pytest.approx(1 / 12)
    assert res["easy"]["mp@1"] == pytest.approx(0.0)
    assert res["easy"]["mp@5"] == pytest.approx(0.5)


def test_truncated_ranking_without_any_positive_scores_zero():
    # query 0 retrieves nothing relevant in its top-2 -> AP = 0, P@k = 0 (counted, not skipped)
    # query 1: positive at rank 0 -> AP = 1, P@k = 1.  Means: 0.5.
    ranks = np.array([[8, 9], [1, 9]])
    gnd = [{"easy": [1, 2], "hard": [], "junk": []}, {"easy": [1], "hard": [], "junk": []}]
    res = revisitop_map(ranks, gnd)
    assert res["easy"]["aps"].tolist() == [0.0, 1.0]
    assert res["easy"]["map"] == pytest.approx(0.5)
    for k in KAPPAS:
        assert res["easy"][f"mp@{k}"] == pytest.approx(0.5)


def test_query_without_positives_is_skipped_from_means():
    ranks = np.array([[0, 1, 2], [0, 1, 2]])
    gnd = [{"easy": [], "hard": [1], "junk": []}, {"easy": [0], "hard": [], "junk": []}]
    res = revisitop_map(ranks, gnd)
    assert np.isnan(res["easy"]["aps"][0])
    assert res["easy"]["map"] == pytest.approx(1.0)  # mean over query 1 only
    assert np.isnan(res["hard"]["aps"][1])
    # hard, query 0: positive 1 at r=1 -> AP = (0/1 + 1/2)/2 = 1/4; query 1 skipped -> mAP = 1/4
    assert res["hard"]["map"] == pytest.approx(0.25)


def test_missing_junk_key_is_empty_and_bbx_is_ignored():
    ranks = np.array([[2, 0, 1]])
    a = revisitop_map(ranks, [{"easy": [0], "hard": [1], "bbx": [0, 0, 1, 1]}])
    b = revisitop_map(ranks, [{"easy": [0], "hard": [1], "junk": []}])
    for protocol in PROTOCOLS:
        assert a[protocol]["map"] == b[protocol]["map"]


@pytest.mark.parametrize(
    ("ranks", "gnd", "match"),
    [
        (np.arange(4), [{"easy": [0], "hard": [], "junk": []}], "2-D"),
        (np.zeros((1, 4)), [{"easy": [0], "hard": [], "junk": []}], "integer"),
        (np.zeros((2, 4), dtype=int), [{"easy": [0], "hard": [], "junk": []}], "query-major"),
        (np.zeros((1, 4), dtype=int), [{"hard": [], "junk": []}], "easy"),
        (np.zeros((1, 4), dtype=int), {"gnd": [], "imlist": [], "qimlist": []}, "cfg"),
    ],
)
def test_revisitop_validation(ranks, gnd, match):
    with pytest.raises(ValueError, match=match):
        revisitop_map(ranks, gnd)


# --------------------------------------------------------------------------------------------------
# revisitop_map vs the loop reference on random data
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_random_full_rankings_match_reference(seed):
    rng = np.random.default_rng(seed)
    n_db, n_queries = int(rng.integers(30, 200)), int(rng.integers(5, 25))
    gnd = random_gnd(rng, n_db, n_queries)
    ranks = random_ranks(rng, n_db, n_queries)
    got = revisitop_map(ranks, gnd)
    assert_matches_reference(got, reference_map(ranks, gnd))
    assert np.isnan(got["easy"]["aps"][::4]).all()  # every 4th query has no easy positives


@pytest.mark.parametrize("seed", [10, 11, 12, 13])
def test_random_truncated_rankings_match_reference(seed):
    rng = np.random.default_rng(seed)
    n_db, n_queries = 300, 20
    gnd = random_gnd(rng, n_db, n_queries)
    ranks = random_ranks(rng, n_db, n_queries, top=15)
    kappas = (1, 3, 5, 10, 20)
    got = revisitop_map(ranks, gnd, kappas=kappas)
    ref = reference_map(ranks, gnd, kappas=kappas)
    assert_matches_reference(got, ref, kappas=kappas)
    # the data must exercise the "no positive retrieved" rule
    assert (got["medium"]["aps"] == 0.0).any()


def test_random_overlapping_gnd_matches_reference():
    # Not in the real data, but the semantics still follow revisitop exactly.
    rng = np.random.default_rng(99)
    gnd = random_gnd(rng, 80, 15, overlap=True)
    ranks = random_ranks(rng, 80, 15)
    assert_matches_reference(revisitop_map(ranks, gnd), reference_map(ranks, gnd))


def test_unsigned_and_int32_ranks_accepted():
    rng = np.random.default_rng(5)
    gnd = random_gnd(rng, 50, 6)
    ranks = random_ranks(rng, 50, 6)
    ref = reference_map(ranks, gnd)
    assert_matches_reference(revisitop_map(ranks.astype(np.uint16), gnd), ref)
    assert_matches_reference(revisitop_map(ranks.astype(np.int32), gnd), ref)


# --------------------------------------------------------------------------------------------------
# revisitop_map on the real ROxford5k / RParis6k ground truth
# --------------------------------------------------------------------------------------------------


def _load_cfg(name: str) -> dict:
    path = GND_DIR / f"gnd_{name}.pkl"
    if not path.is_file():
        pytest.skip(f"revisitop ground truth not available at {path}")
    with path.open("rb") as f:
        return pickle.load(f)


@pytest.fixture(params=["roxford5k", "rparis6k"])
def cfg(request) -> dict:
    return _load_cfg(request.param)


def _positives_first(cfg: dict, protocol: str, reverse: bool = False) -> np.ndarray:
    n_db = len(cfg["imlist"])
    ranks = []
    for g in cfg["gnd"]:
        positives, _ = _protocol_lists(g, protocol)
        rest = np.setdiff1d(np.arange(n_db), positives)
        row = np.concatenate([np.asarray(positives, dtype=np.int64), rest])
        ranks.append(row[::-1] if reverse else row)
    return np.stack(ranks)


def test_roxford5k_known_facts():
    cfg = _load_cfg("roxford5k")
    assert len(cfg["gnd"]) == 70
    assert len(cfg["imlist"]) == 4993
    empty_easy = [i for i, g in enumerate(cfg["gnd"]) if len(g["easy"]) == 0]
    assert len(empty_easy) == 2
    ranks = np.stack([np.random.default_rng(0).permutation(4993) for _ in range(70)])
    res = revisitop_map(ranks, cfg["gnd"])
    assert np.isnan(res["easy"]["aps"]).sum() == 2  # Easy mAP averages 68 queries
    assert np.flatnonzero(np.isnan(res["easy"]["aps"])).tolist() == empty_easy
    assert not np.isnan(res["medium"]["aps"]).any()
    assert not np.isnan(res["hard"]["aps"]).any()
    valid = res["easy"]["aps"][~np.isnan(res["easy"]["aps"])]
    assert valid.size == 68
    assert res["easy"]["map"] == pytest.approx(valid.mean())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_real_gnd_positives_first_is_perfect(cfg, protocol):
    res = revisitop_map(_positives_first(cfg, protocol), cfg["gnd"])
    assert res[protocol]["map"] == pytest.approx(1.0)
    for k in KAPPAS:
        assert res[protocol][f"mp@{k}"] == pytest.approx(1.0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_real_gnd_reversed_ranking_is_low(cfg, protocol):
    res = revisitop_map(_positives_first(cfg, protocol, reverse=True), cfg["gnd"])
    assert res[protocol]["map"] < 0.05
    assert res[protocol]["mp@1"] < 0.05


def test_real_gnd_junk_at_rank_0_does_not_change_ap(cfg):
    gnd = cfg["gnd"]
    n_db = len(cfg["imlist"])
    rng = np.random.default_rng(1)
    ranks = np.stack([rng.permutation(n_db) for _ in gnd])
    moved = ranks.copy()
    n_moved = 0
    for i, g in enumerate(gnd):
        if len(g["junk"]) == 0:
            continue
        junk_img = g["junk"][int(rng.integers(len(g["junk"])))]
        row = moved[i][moved[i] != junk_img]
        moved[i] = np.concatenate([[junk_img], row])
        n_moved += 1
    assert n_moved > 0
    before, after = revisitop_map(ranks, gnd), revisitop_map(moved, gnd)
    for protocol in PROTOCOLS:
        np.testing.assert_allclose(
            after[protocol]["aps"], before[protocol]["aps"], atol=1e-12, equal_nan=True
        )
        for k in KAPPAS:
            assert after[protocol][f"mp@{k}"] == pytest.approx(before[protocol][f"mp@{k}"], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_real_gnd_random_permutations_match_reference(cfg, seed):
    gnd = cfg["gnd"]
    n_db = len(cfg["imlist"])
    rng = np.random.default_rng(seed)
    ranks = np.stack([rng.permutation(n_db) for _ in gnd])
    assert_matches_reference(revisitop_map(ranks, gnd), reference_map(ranks, gnd))


def test_real_gnd_truncated_top100_matches_reference(cfg):
    gnd = cfg["gnd"]
    n_db = len(cfg["imlist"])
    rng = np.random.default_rng(7)
    ranks = np.stack([rng.permutation(n_db) for _ in gnd])[:, :100]
    assert_matches_reference(revisitop_map(ranks, gnd), reference_map(ranks, gnd))


# --------------------------------------------------------------------------------------------------
# GLDv2 mAP@100
# --------------------------------------------------------------------------------------------------


def test_gldv2_hand_case():
    # relevant {a, b}; predictions [a, x, b]: P(1) = 1, P(3) = 2/3 -> AP = (1 + 2/3) / min(2, 100)
    assert gldv2_map_at_k({"q": ["a", "x", "b"]}, {"q": ["a", "b"]}) == pytest.approx((1 + 2 / 3) / 2)


def test_gldv2_missing_and_extra_queries():
    solution = {"q1": ["a"], "q2": ["b"], "q_empty": []}
    predictions = {"q1": ["a", "z"], "q_extra": ["a"]}
    # q1: AP 1; q2 missing from predictions: 0; q_empty ignored (not counted in Q); q_extra ignored.
    assert gldv2_map_at_k(predictions, solution) == pytest.approx(0.5)
    # an empty prediction list also scores 0
    assert gldv2_map_at_k({"q1": ["a"], "q2": []}, solution) == pytest.approx(0.5)


def test_gldv2_k_truncation():
    # relevant {a, b}, predictions [x, a, b] at k=2: only x, a count -> P(2) = 1/2 -> AP = (1/2) / min(2, 2)
    assert gldv2_map_at_k({"q": ["x", "a", "b"]}, {"q": ["a", "b"]}, k=2) == pytest.approx(0.25)
    # m_q = 5 > k = 2: normaliser is min(5, 2) = 2 -> two hits at the top give AP = 1
    solution = {"q": ["r1", "r2", "r3", "r4", "r5"]}
    assert gldv2_map_at_k({"q": ["r1", "r2", "r3"]}, solution, k=2) == pytest.approx(1.0)
    # m_q = 5, k = 100: same two hits -> (1 + 1) / 5
    assert gldv2_map_at_k({"q": ["r1", "r2"]}, solution) == pytest.approx(2 / 5)


def test_gldv2_duplicates_count_once():
    # [a, a, b]: a at 1 -> 1/1; the repeated a is not relevant but keeps position 2; b at 3 -> 2/3
    assert gldv2_map_at_k({"q": ["a", "a", "b"]}, {"q": ["a", "b"]}) == pytest.approx((1 + 2 / 3) / 2)


def test_gldv2_matches_formula_on_random_data():
    rng = np.random.default_rng(3)
    ids = [f"i{n}" for n in range(40)]
    solution, predictions = {}, {}
    for q in range(30):
        solution[f"q{q}"] = list(rng.choice(ids, size=int(rng.integers(1, 12)), replace=False))
        predictions[f"q{q}"] = list(rng.choice(ids, size=int(rng.integers(0, 30)), replace=False))
    k = 10
    total = 0.0
    for q, rel in solution.items():
        preds = predictions[q][:k]
        hits = [1 if p in rel else 0 for p in preds]
        total += sum(sum(hits[: i + 1]) / (i + 1) * hits[i] for i in range(len(preds))) / min(len(rel), k)
    assert gldv2_map_at_k(predictions, solution, k=k) == pytest.approx(total / len(solution))


def test_gldv2_no_relevant_queries_is_nan():
    assert math.isnan(gldv2_map_at_k({"q": ["a"]}, {"q": []}))


def test_map_at_k_on_arrays_equals_the_gldv2_scorer():
    """Evaluation's array form (ranks of db indices, -1 padding) = the id-based Kaggle scorer."""
    rng = np.random.default_rng(5)
    for _ in range(50):
        n_db, k = 40, int(rng.integers(1, 15))
        ranks = np.stack([rng.choice(n_db, 20, replace=bool(rng.random() < 0.3)) for _ in range(8)])
        ranks[:, int(rng.integers(5, 21)):] = -1  # fewer results than asked
        positives = [rng.choice(n_db, int(rng.integers(0, 9)), replace=False) for _ in range(8)]
        got = map_at_k(ranks, positives, k)
        predictions = {f"q{q}": [f"i{j}" for j in row if j >= 0] for q, row in enumerate(ranks)}
        solution = {f"q{q}": [f"i{j}" for j in pos] for q, pos in enumerate(positives)}
        want = gldv2_map_at_k(predictions, solution, k)
        assert (math.isnan(want) and math.isnan(got[f"map@{k}"])) or got[f"map@{k}"] == pytest.approx(want)
        assert all(np.isnan(ap) == (len(pos) == 0) for ap, pos in zip(got["aps"], positives, strict=True))
    assert map_at_k(np.array([[0, 5, 1]]), [[1, 0]], 100)["map@100"] == pytest.approx((1 + 2 / 3) / 2)


# --------------------------------------------------------------------------------------------------
# GUIE mP@5
# --------------------------------------------------------------------------------------------------


def test_guie_hand_cases():
    # n_q = 2, both in the top 2 -> precision@min(2, 5) = 2/2 = 1
    assert guie_mp_at_k(np.array([[3, 4, 0, 1, 2]]), [{3, 4}]) == pytest.approx(1.0)
    # n_q = 10, 3 hits in the top 5 -> 3/5
    ranks = np.array([[0, 50, 1, 51, 2, 3, 4]])
    assert guie_mp_at_k(ranks, [set(range(10))]) == pytest.approx(0.6)
    # n_q = 2 but the two positives sit at ranks 3 and 4: the official scorer looks only at the top
    # min(n_q, 5) = 2 results -> 0
    assert guie_mp_at_k(np.array([[0, 1, 3, 4, 2]]), [{3, 4}]) == pytest.approx(0.0)
    # n_q = 2, one hit in the top 2 -> 1/2
    assert guie_mp_at_k(np.array([[3, 0, 4, 1, 2]]), [{3, 4}]) == pytest.approx(0.5)


def test_guie_mean_and_skipped_queries():
    ranks = np.array([[3, 4, 0, 1, 2], [0, 50, 1, 51, 2], [7, 8, 9, 10, 11]])
    positives = [[3, 4], list(range(10)), []]  # third query has n_q = 0 -> skipped
    assert guie_mp_at_k(ranks, positives) == pytest.approx((1.0 + 0.6) / 2)
    assert math.isnan(guie_mp_at_k(ranks[2:], [[]]))


def test_guie_short_rows_and_duplicates():
    # row shorter than min(n_q, k): missing results are misses -> 2 hits / 5
    assert guie_mp_at_k(np.array([[0, 1]]), [range(10)]) == pytest.approx(0.4)
    # a repeated index counts once: [0, 0, 1] with n_q = 3 -> 2/3
    assert guie_mp_at_k(np.array([[0, 0, 1, 5, 6]]), [[0, 1, 2]]) == pytest.approx(2 / 3)


def test_guie_ignore_removes_junk_before_the_cut():
    # leave-one-out: the query itself (db 0) ranks first; ignored, the next two are its positives -> 1
    ranks = np.array([[0, 3, 4, 1, 2]])
    assert guie_mp_at_k(ranks, [{3, 4}]) == pytest.approx(0.5)
    assert guie_mp_at_k(ranks, [{3, 4}], ignore=[[0]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ignore has 2 entries for 1 queries"):
        guie_mp_at_k(ranks, [{3, 4}], ignore=[[0], [1]])


def test_guie_validation():
    with pytest.raises(ValueError, match="query-major"):
        guie_mp_at_k(np.zeros((2, 5), dtype=int), [[0]])
    with pytest.raises(ValueError, match="integer"):
        guie_mp_at_k(np.zeros((1, 5)), [[0]])
