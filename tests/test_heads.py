"""Margin heads checked against the papers' formulas on hand-worked 2-D cases.

Embeddings and weight rows are 2-D vectors at known angles (with arbitrary norms, which the
heads must normalise away), so every θ is known and each expected logit is written with `math`.
"""

import json
import math

import pytest
import torch

from retrieval.models.heads import (
    HEADS,
    AdaCos,
    ArcFace,
    CosFace,
    SoftmaxHead,
    SubCenterArcFace,
    adacos_dynamic_scale,
    adacos_fixed_scale,
    arcface_logits,
    cosface_logits,
    cosine_logits,
    create_head,
    dynamic_margins,
    subcenter_cosine,
)

S, M = 30.0, 0.3


def vec(deg: float, norm: float = 1.0) -> list[float]:
    return [norm * math.cos(math.radians(deg)), norm * math.sin(math.radians(deg))]


def rows(*degs: float) -> torch.Tensor:
    """2-D rows at ``degs`` with norms 0.5, 1, 2, 0.5, ... (normalisation must remove them)."""
    return torch.tensor([vec(d, (0.5, 1.0, 2.0)[i % 3]) for i, d in enumerate(degs)])


def cosd(deg: float) -> float:
    return math.cos(math.radians(deg))


def angle(a: float, b: float) -> float:
    """The angle in degrees between directions ``a`` and ``b``, in [0, 180]."""
    return abs((a - b + 180.0) % 360.0 - 180.0)


def with_weight(head: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Module:
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-6)


def labels(*ys: int) -> torch.Tensor:
    return torch.tensor(ys, dtype=torch.int64)


def test_cosine_logits_normalises_both_sides():
    x = torch.tensor([vec(0.0, 3.0), vec(45.0, 0.2)])
    close(cosine_logits(x, rows(60.0, 90.0)), [[cosd(60), cosd(90)], [cosd(15), cosd(45)]], atol=1e-6)


def test_arcface_normal_branch():
    head = with_weight(ArcFace(2, 3, s=S, m=M), rows(0.0, 90.0, 180.0))
    x = torch.tensor([vec(40.0, 2.0), vec(100.0, 0.7)])
    m_deg = math.degrees(M)
    expected = [[S * cosd(40 + m_deg), S * cosd(50), S * cosd(140)],
                [S * cosd(100), S * cosd(10 + m_deg), S * cosd(80)]]
    close(head(x, labels(0, 1)), expected)


def test_arcface_fallback_when_theta_plus_m_exceeds_pi():
    # θ = 175° > π − m (≈ 162.8°): cos(θ + m) would rise again, so cos θ − m·sin m is used; θ = 160° stays normal
    head = with_weight(ArcFace(2, 2, s=S, m=M), rows(0.0, 90.0))
    out = head(torch.tensor([vec(175.0), vec(160.0)]), labels(0, 0))
    close(out[0, 0], S * (cosd(175) - M * math.sin(M)))
    close(out[1, 0], S * cosd(160 + math.degrees(M)))
    close(out[:, 1], [S * cosd(85), S * cosd(70)])
    assert abs(out[0, 0].item() - S * cosd(175 + math.degrees(M))) > 1.0  # the branch matters


def test_arcface_easy_margin_keeps_obtuse_targets():
    x, y, w = torch.tensor([vec(120.0), vec(30.0)]), labels(0, 0), rows(0.0, 90.0)
    easy = with_weight(ArcFace(2, 2, s=S, m=M, easy_margin=True), w)(x, y)
    close(easy[:, 0], [S * cosd(120), S * cosd(30 + math.degrees(M))])  # cos θ ≤ 0: no margin
    hard = with_weight(ArcFace(2, 2, s=S, m=M), w)(x, y)
    close(hard[0, 0], S * cosd(120 + math.degrees(M)))  # θ + m < π: the normal branch without easy_margin


def test_arcface_logits_per_sample_margin_tensor():
    cos = torch.tensor([[0.5, 0.1], [0.2, 0.8]])
    out = arcface_logits(cos, labels(0, 1), 2.0, torch.tensor([0.1, 0.5]))
    sin = math.sqrt
    expected = [[2 * (0.5 * math.cos(0.1) - sin(1 - 0.25) * math.sin(0.1)), 2 * 0.1],
                [2 * 0.2, 2 * (0.8 * math.cos(0.5) - sin(1 - 0.64) * math.sin(0.5))]]
    close(out, expected, atol=1e-6)
    close(arcface_logits(cos, labels(0, 1), 2.0, 0.1)[0], expected[0], atol=1e-6)  # float m == tensor m


def test_cosface_subtracts_margin_from_target_cosine():
    head = with_weight(CosFace(2, 3, s=S, m=M), rows(0.0, 90.0, 180.0))
    out = head(torch.tensor([vec(30.0, 5.0), vec(135.0)]), labels(0, 2))
    close(out, [[S * (cosd(30) - M), S * cosd(60), S * cosd(150)],
                [S * cosd(135), S * cosd(45), S * (cosd(45) - M)]])
    close(cosface_logits(torch.tensor([[0.4, 0.9]]), labels(1), 10.0, torch.tensor([0.25])),
          [[4.0, 6.5]], atol=1e-6)


def test_adacos_fixed_scale():
    assert adacos_fixed_scale(10) == pytest.approx(math.sqrt(2) * math.log(9), rel=1e-12)
    assert adacos_fixed_scale(10, math.pi / 3) == pytest.approx(2 * math.log(9), rel=1e-12)
    head = AdaCos(2, 10, dynamic=False)
    assert head.s.item() == pytest.approx(math.sqrt(2) * math.log(9), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        AdaCos(2, 1)


def test_adacos_dynamic_update_by_hand():
    w_deg, x_deg, y = [0.0, 120.0, 240.0], [10.0, 100.0, 250.0], [0, 1, 2]
    head = with_weight(AdaCos(2, 3), rows(*w_deg)).train()
    s0 = math.sqrt(2) * math.log(2)
    theta = [[angle(a, b) for b in w_deg] for a in x_deg]  # target angles 10°, 20°, 10°
    b_avg = sum(math.exp(s0 * cosd(theta[i][j])) for i in range(3) for j in range(3) if j != y[i]) / 3
    theta_med = sorted(theta[i][y[i]] for i in range(3))[1]
    s1 = math.log(b_avg) / math.cos(min(math.pi / 4, math.radians(theta_med)))
    x = torch.tensor([vec(d, 1.5) for d in x_deg])
    out = head(x, labels(*y))
    assert head.s.item() == pytest.approx(s1, rel=1e-5) and abs(s1 - s0) > 0.1
    close(out, [[s1 * cosd(t) for t in row] for row in theta])
    head.eval()
    head(x, labels(*y))
    head.train()
    head(x)
    assert head.s.item() == pytest.approx(s1, rel=1e-5)  # eval mode and labels=None leave s alone
    fixed = with_weight(AdaCos(2, 3, dynamic=False), rows(*w_deg)).train()
    close(fixed(x, labels(*y)), [[s0 * cosd(t) for t in row] for row in theta])
    assert fixed.s.item() == pytest.approx(s0, rel=1e-6)


def test_adacos_dynamic_scale_caps_median_angle_at_pi_over_4():
    cos = torch.tensor([[cosd(60), cosd(100)], [cosd(30), cosd(70)], [cosd(80), cosd(80)]])
    y, s_prev = labels(0, 1, 1), 3.0
    b_avg = (math.exp(s_prev * cosd(100)) + math.exp(s_prev * cosd(30)) + math.exp(s_prev * cosd(80))) / 3
    # target angles 60°, 70°, 80°: θ_med = 70° > 45°, so cos(π/4) divides
    close(adacos_dynamic_scale(cos, y, s_prev), math.log(b_avg) / math.cos(math.pi / 4))


def test_subcenter_takes_the_closest_subcentre():
    # class 0 sub-centres at 100°, 20°, 70°; class 1 at -90°, 180°, -50° (rows c·K + k)
    w = rows(100.0, 20.0, 70.0, -90.0, 180.0, -50.0)
    x = torch.tensor([vec(0.0), vec(175.0, 3.0)])
    close(subcenter_cosine(x, w, 3), [[cosd(20), cosd(50)], [cosd(75), cosd(5)]], atol=1e-6)
    head = with_weight(SubCenterArcFace(2, 2, k=3, s=S, m=M), w)
    assert head.weight.shape == (6, 2)
    m_deg = math.degrees(M)
    close(head(x, labels(0, 1)), [[S * cosd(20 + m_deg), S * cosd(50)], [S * cosd(75), S * cosd(5 + m_deg)]])
    close(head(x), [[S * cosd(20), S * cosd(50)], [S * cosd(75), S * cosd(5)]])


def test_dynamic_margins_values():
    # n^(-1/4) of 1, 16, 81 is 1, 1/2, 1/3
    close(dynamic_margins([1, 16, 81]), [0.55, 0.3, 0.05 + 0.5 / 3], atol=1e-7)
    close(dynamic_margins(torch.tensor([4]), a=1.0, b=0.0, lam=0.5), [0.5], atol=1e-7)
    for bad in ([], [3, 0]):
        with pytest.raises(ValueError, match="positive image counts"):
            dynamic_margins(bad)


def test_arcface_uses_the_margin_of_each_samples_class():
    head = with_weight(ArcFace(2, 3, s=S, m=M, class_counts=[1, 16, 81], dynamic_margin=True), rows(0.0, 90.0, 180.0))
    close(head.margins, [0.55, 0.3, 0.05 + 0.5 / 3], atol=1e-7)
    out = head(torch.tensor([vec(30.0), vec(150.0)]), labels(0, 2))
    close(out[0, 0], S * math.cos(math.radians(30) + 0.55))
    close(out[1, 2], S * math.cos(math.radians(30) + 0.05 + 0.5 / 3))
    close(out[:, 1], [S * cosd(60), S * cosd(60)])
    partial = ArcFace(2, 3, class_counts=[1, 16, 81], dynamic_margin={"b": 0.1})
    close(partial.margins, [0.6, 0.35, 0.1 + 0.5 / 3], atol=1e-7)
    assert partial.config()["dynamic_margin"] == {"a": 0.5, "b": 0.1, "lam": 0.25}
    close(ArcFace(2, 3, m=0.4, class_counts=[1, 16, 81]).margins, [0.4] * 3)  # counts alone change nothing
    with pytest.raises(ValueError, match="3 entries for 4 classes"):
        ArcFace(2, 4, class_counts=[1, 2, 3], dynamic_margin=True)
    with pytest.raises(ValueError, match=r"unknown dynamic_margin keys \['lambda'\]"):
        ArcFace(2, 3, class_counts=[1, 2, 3], dynamic_margin={"lambda": 0.5})


@pytest.mark.parametrize("name", sorted(HEADS))
def test_no_labels_returns_scaled_cosine(name):
    torch.manual_seed(0)
    head = create_head(name, 6, 5).train()
    x = torch.randn(4, 6)
    out = head(x)
    if name == "softmax":
        close(out, x @ head.weight.T, atol=1e-6)
        close(head(x, labels(0, 1, 2, 3)), out, atol=0)  # a plain classifier ignores labels
    else:
        cos = subcenter_cosine(x, head.weight, 3) if name == "subcenter_arcface" else cosine_logits(x, head.weight)
        scale = head.s.item() if name == "adacos" else S
        close(out, scale * cos)


def test_label_smoothing_loss_matches_hand_computed_cross_entropy():
    z, y, eps = [1.0, 2.0, 0.5], 0, 0.1
    log_p = [v - math.log(sum(math.exp(u) for u in z)) for v in z]
    expected = -sum(((1 - eps) * (c == y) + eps / 3) * log_p[c] for c in range(3))
    head = CosFace(2, 3, label_smoothing=eps)
    assert head.loss(torch.tensor([z]), labels(y)).item() == pytest.approx(expected, rel=1e-6)
    assert CosFace(2, 3).loss(torch.tensor([z]), labels(y)).item() == pytest.approx(-log_p[y], rel=1e-6)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_gradients_reach_weight_and_embeddings(name):
    torch.manual_seed(0)
    head = create_head(name, 8, 5).train()
    x = torch.randn(6, 8, requires_grad=True)
    head.loss(head(x, torch.randint(0, 5, (6,))), torch.randint(0, 5, (6,))).backward()
    for grad in (head.weight.grad, x.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_arcface_gradient_finite_when_embedding_lies_on_its_class_row():
    head = ArcFace(4, 3)
    x = head.weight.detach()[:1].clone().requires_grad_(True)  # cos θ = 1, where d sqrt(1 − cos²) blows up
    head.loss(head(x, labels(0)), labels(0)).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("name, kwargs", [
    ("arcface", {"s": 20.0, "m": 0.4, "easy_margin": True, "label_smoothing": 0.1}),
    ("arcface", {"class_counts": [3, 1, 7, 2], "dynamic_margin": {"a": 0.4}}),
    ("cosface", {"s": 16.0, "m": 0.2}),
    ("adacos", {"theta_zero": 1.0}),
    ("subcenter_arcface", {"k": 2, "m": 0.5, "class_counts": [3, 1, 7, 2], "dynamic_margin": True}),
    ("softmax", {"label_smoothing": 0.2}),
])
def test_config_rebuild_and_state_dict_round_trip(name, kwargs):
    torch.manual_seed(0)
    head = create_head(name, 8, 4, **kwargs).train()
    x, y = torch.randn(5, 8), labels(0, 1, 2, 3, 1)
    head(x, y)  # one training step: AdaCos moves its s
    head.eval()
    expected, expected_none = head(x, y), head(x)
    config = head.config()
    assert "class_counts" not in config and "n_classes" not in config and "in_features" not in config
    meta = json.loads(json.dumps({"name": name, "in_features": 8, "n_classes": 4, **config}))
    rebuilt = create_head(meta.pop("name"), meta.pop("in_features"), meta.pop("n_classes"), **meta)
    if "class_counts" in kwargs:  # the counts are gone: only the state dict brings the margins back
        assert torch.equal(rebuilt.margins, torch.full((4,), rebuilt.m))
        assert not torch.allclose(head.margins, rebuilt.margins)
    if name == "adacos":
        assert abs(head.s.item() - adacos_fixed_scale(4, 1.0)) > 1e-3 and "s" in head.state_dict()
    rebuilt.load_state_dict(head.state_dict())
    rebuilt.eval()
    assert type(rebuilt) is type(head) and rebuilt.config() == config
    close(rebuilt(x, y), expected, atol=1e-6)
    close(rebuilt(x), expected_none, atol=1e-6)


def test_create_head_registry():
    expected = {"arcface": ArcFace, "cosface": CosFace, "adacos": AdaCos, "subcenter_arcface": SubCenterArcFace,
                "softmax": SoftmaxHead}
    assert dict(HEADS) == expected
    head = create_head("arcface", 4, 3, s=None, m=None, easy_margin=None, label_smoothing=None)  # None ignored
    assert (head.s, head.m, head.easy_margin, head.label_smoothing) == (30.0, 0.3, False, 0.0)
    sub = create_head("subcenter_arcface", 4, 3, k=None)
    assert sub.k == 3 and sub.weight.shape == (9, 4) and head.weight.shape == (3, 4)
    bound = math.sqrt(6 / (4 + 3))  # xavier-uniform on (C, D)
    assert head.weight.abs().max() <= bound and head.weight.std() > 0.1 * bound
    with pytest.raises(ValueError, match=r"unknown head 'sphereface'; choose from \['adacos', 'arcface'"):
        create_head("sphereface", 4, 3)
