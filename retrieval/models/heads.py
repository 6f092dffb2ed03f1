"""Margin heads for metric learning: ArcFace, CosFace, AdaCos, sub-center ArcFace, and a plain softmax.

A head sits on top of the embedding during training only: it maps embeddings ``x`` ``(B, D)``
and labels ``y`` ``(B,)`` (int64) to logits ``(B, C)``, already multiplied by the scale ``s``,
ready for ``F.cross_entropy``. Descriptors never pass through it. With ``labels=None``
(inference, recognition by nearest class) every margin head returns ``s · cos θ``, no margin.

``cos θ_ij`` is the cosine between the L2-normalised embedding ``x_i`` and the L2-normalised
weight row ``W_j``; ``W`` is a Parameter ``weight`` of shape ``(C·K, D)`` (``K = 1`` except for
sub-center ArcFace). On the target logit ``j = y_i`` only:

- ArcFace (Deng et al., CVPR 2019): ``s · cos(θ + m)``; where ``θ + m > π`` the curve stops being
  monotonic, so (insightface / arcface-pytorch, as in Landmark2019) ``cos θ − m · sin m`` is used
  there instead; ``easy_margin`` keeps ``cos θ`` wherever ``cos θ ≤ 0``.
- CosFace (Wang et al., CVPR 2018): ``s · (cos θ − m)``.
- AdaCos (Zhang et al., CVPR 2019): no margin, ``s · cos θ`` with ``s = log(C − 1) / cos θ_0``
  (fixed), or updated every training step to ``log B_avg / cos(min(π/4, θ_med))`` (dynamic).
- Sub-center ArcFace (Deng et al., ECCV 2020): ``K`` rows per class, ``cos θ_ij = max_k cos θ_ijk``,
  then the ArcFace margin; noisy images settle on a non-dominant sub-centre.
- Class-frequency dynamic margins (Ha et al., GLR2020 3rd place, arXiv 2010.05350; GUIE 2nd place):
  ``m_c = a · n_c^(−λ) + b``, so rare classes get larger margins; ArcFace then uses ``m_{y_i}``.

Maths lives in the functions; the modules only own ``weight`` (and buffers) and call them. The
modules compute the margin in float32 even under autocast: an fp16 ``cos θ`` moves ``s · cos`` by ~1e-2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Keeps sqrt(1 − cos²) differentiable at cos = ±1 (an embedding on its class row); changes sin by ≤ 1e-6.
_SIN_EPS = 1e-12
# Keeps acos away from ±1, where its derivative is infinite and float32 cos may overshoot.
_ACOS_EPS = 1e-7

DYNAMIC_MARGIN_DEFAULTS: dict[str, float] = {"a": 0.5, "b": 0.05, "lam": 0.25}


def cosine_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cos θ`` ``(B, C)`` between L2-normalised rows of ``x`` ``(B, D)`` and ``weight`` ``(C, D)``."""
    return F.linear(F.normalize(x, dim=-1), F.normalize(weight, dim=-1))


def subcenter_cosine(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Sub-center cosine: ``weight`` ``(C·K, D)``, rows ``c·K .. c·K+K−1`` of class c; max over K (Deng et al. 2020)."""
    cos = cosine_logits(x, weight)
    return cos.view(cos.shape[0], -1, k).amax(dim=-1)


def _per_sample(m: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A float or ``(B,)`` margin as a ``(B, 1)`` tensor matching ``like``'s dtype and device."""
    return torch.as_tensor(m, dtype=like.dtype, device=like.device).reshape(-1, 1)


def arcface_logits(cos: torch.Tensor, labels: torch.Tensor, s: float, m: torch.Tensor | float,
                   easy_margin: bool = False) -> torch.Tensor:
    """``s · cos θ`` with the target logit replaced by ``cos(θ + m)`` (Deng et al., CVPR 2019).

    ``m`` is a float or a per-sample tensor ``(B,)`` (per-class margins: ``margins[labels]``).
    """
    index = labels.long().view(-1, 1)
    m = _per_sample(m, cos)
    target = cos.gather(1, index)
    sin = (1.0 - target * target).clamp(min=_SIN_EPS).sqrt()
    phi = target * torch.cos(m) - sin * torch.sin(m)  # cos(θ + m) = cos θ cos m − sin θ sin m
    if easy_margin:
        phi = torch.where(target > 0, phi, target)
    else:  # θ + m > π ⇔ cos θ < cos(π − m): fall back to the linear CosFace-like penalty m·sin m
        phi = torch.where(target > torch.cos(math.pi - m), phi, target - m * torch.sin(m))
    return cos.scatter(1, index, phi) * s


def cosface_logits(cos: torch.Tensor, labels: torch.Tensor, s: float, m: torch.Tensor | float) -> torch.Tensor:
    """``s · (cos θ − m)`` on the target, ``s · cos θ`` elsewhere (Wang et al., CVPR 2018)."""
    index = labels.long().view(-1, 1)
    return cos.scatter(1, index, cos.gather(1, index) - _per_sample(m, cos)) * s


def adacos_fixed_scale(n_classes: int, theta_zero: float = math.pi / 4) -> float:
    """AdaCos fixed scale ``log(C − 1) / cos θ_0`` (Zhang et al., CVPR 2019, eq. 11); ``√2·log(C − 1)`` at π/4."""
    if n_classes < 2:
        raise ValueError(f"AdaCos needs at least 2 classes, got {n_classes}")
    return math.log(n_classes - 1) / math.cos(theta_zero)


@torch.no_grad()
def adacos_dynamic_scale(cos: torch.Tensor, labels: torch.Tensor, s_prev: torch.Tensor | float) -> torch.Tensor:
    """AdaCos's next scale ``log B_avg / cos(min(π/4, θ_med))`` (Zhang et al., CVPR 2019, Algorithm 1).

    ``B_avg = mean_i Σ_{j≠y_i} exp(s_prev · cos θ_ij)``, ``θ_med`` = median of the target angles
    (``torch.median``: the lower middle value for an even batch). Returns a 0-d float32 tensor.
    """
    cos = cos.detach().float()
    index = labels.long().view(-1, 1)
    s_prev = torch.as_tensor(s_prev, dtype=cos.dtype, device=cos.device)
    # log B_avg as a logsumexp over the non-target entries, so exp(s·cos) cannot overflow
    others = (s_prev * cos).scatter(1, index, float("-inf"))
    log_b_avg = torch.logsumexp(others.flatten(), dim=0) - math.log(cos.shape[0])
    theta = torch.acos(cos.gather(1, index).clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
    theta_med = theta.flatten().median().clamp(max=math.pi / 4)
    return log_b_avg / torch.cos(theta_med)


def dynamic_margins(class_counts: Sequence[int] | torch.Tensor, a: float = 0.5, b: float = 0.05,
                    lam: float = 0.25) -> torch.Tensor:
    """Per-class margins ``m_c = a · n_c^(−λ) + b`` ``(C,)`` float32 (Ha et al., GLR2020 3rd place)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0 or bool((counts <= 0).any()):
        raise ValueError("class_counts must be a non-empty sequence of positive image counts")
    return (a * counts.pow(-lam) + b).float()


def _dynamic_margin_config(dynamic_margin: dict | bool | None) -> dict[str, float] | None:
    """``True`` → the defaults, a dict → the defaults updated by it, falsy → None."""
    if not dynamic_margin:
        return None
    given = {} if dynamic_margin is True else dict(dynamic_margin)
    unknown = sorted(set(given) - set(DYNAMIC_MARGIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown dynamic_margin keys {unknown}; choose from {sorted(DYNAMIC_MARGIN_DEFAULTS)}")
    return {k: float(v) for k, v in {**DYNAMIC_MARGIN_DEFAULTS, **given}.items()}


class MarginHead(nn.Module):
    """Base head: owns ``weight`` ``(C·K, D)`` (xavier-uniform), ``n_classes`` and the cross-entropy loss."""

    def __init__(self, in_features: int, n_classes: int, label_smoothing: float = 0.0, k: int = 1) -> None:
        super().__init__()
        self.in_features, self.n_classes = int(in_features), int(n_classes)
        self.label_smoothing = float(label_smoothing)
        self.weight = nn.Parameter(torch.empty(self.n_classes * int(k), self.in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable kwargs that, with ``in_features`` and ``n_classes``, rebuild this head."""
        return {"label_smoothing": self.label_smoothing}

    def set_scale_margin(self, s: float | None = None, m: float | None = None) -> None:
        """New ``s`` / margin ``m`` for the stages to come (GUIE 2022 1st place raises m 0.55 → 0.65)."""
        raise ValueError(f"{type(self).__name__} has no scale or margin to set")

    def extra_repr(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"in_features={self.in_features}, n_classes={self.n_classes}, {extra}"


class SoftmaxHead(MarginHead):
    """Plain linear classifier ``x Wᵀ`` (no bias, no normalisation, no scale): the classifier-head stage.

    ``weight`` has the same ``(C, D)`` shape as ArcFace's, so a later stage can start from it.
    """

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight)


class _AngularMarginHead(MarginHead):
    """ArcFace over ``k`` rows per class, shared by `ArcFace` (k = 1) and `SubCenterArcFace`."""

    def __init__(self, in_features: int, n_classes: int, k: int, s: float, m: float, easy_margin: bool,
                 class_counts: Sequence[int] | torch.Tensor | None, dynamic_margin: dict | bool | None,
                 label_smoothing: float) -> None:
        super().__init__(in_features, n_classes, label_smoothing, k=k)
        self.k, self.s, self.m, self.easy_margin = int(k), float(s), float(m), bool(easy_margin)
        self.dynamic_margin = _dynamic_margin_config(dynamic_margin)
        margins = torch.full((self.n_classes,), self.m)
        if self.dynamic_margin is not None and class_counts is not None:
            margins = dynamic_margins(class_counts, **self.dynamic_margin)
            if margins.numel() != self.n_classes:
                raise ValueError(f"class_counts has {margins.numel()} entries for {self.n_classes} classes")
        self.register_buffer("margins", margins, persistent=True)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """``cos θ`` ``(B, C)``; the closest sub-centre when ``k > 1``."""
        return cosine_logits(x, self.weight) if self.k == 1 else subcenter_cosine(x, self.weight, self.k)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(x).float()
        if labels is None:
            return cos * self.s
        return arcface_logits(cos, labels, self.s, self.margins[labels], self.easy_margin)

    def config(self) -> dict[str, Any]:
        return {"s": self.s, "m": self.m, "easy_margin": self.easy_margin, "dynamic_margin": self.dynamic_margin,
                "label_smoothing": self.label_smoothing}

    def set_scale_margin(self, s: float | None = None, m: float | None = None) -> None:
        if m is not None:
            if self.dynamic_margin is not None:
                raise ValueError("a per-stage margin does not apply with dynamic_margin (per-class margins)")
            self.m = float(m)
            self.margins.fill_(self.m)
        if s is not None:
            self.s = float(s)


class ArcFace(_AngularMarginHead):
    """Additive angular margin; per-class margins live in the persistent buffer ``margins`` ``(C,)``.

    ``dynamic_margin`` (``True`` or a dict of ``a``, ``b``, ``lam``) with ``class_counts`` fills
    ``margins`` with `dynamic_margins`; without counts (a rebuild from `config`) the buffer holds
    ``m`` until ``load_state_dict`` restores the trained per-class values.
    """

    def __init__(self, in_features: int, n_classes: int, s: float = 30.0, m: float = 0.3, easy_margin: bool = False,
                 class_counts: Sequence[int] | torch.Tensor | None = None, dynamic_margin: dict | bool | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(in_features, n_classes, 1, s, m, easy_margin, class_counts, dynamic_margin, label_smoothing)


class SubCenterArcFace(_AngularMarginHead):
    """ArcFace over ``k`` sub-centres per class (``weight`` ``(C·k, D)``, class c in rows ``c·k .. c·k+k−1``).

    Takes ArcFace's ``class_counts`` / ``dynamic_margin`` too (GLR2020 3rd place combined the two).
    """

    def __init__(self, in_features: int, n_classes: int, k: int = 3, s: float = 30.0, m: float = 0.3,
                 easy_margin: bool = False, class_counts: Sequence[int] | torch.Tensor | None = None,
                 dynamic_margin: dict | bool | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(in_features, n_classes, k, s, m, easy_margin, class_counts, dynamic_margin, label_smoothing)

    def config(self) -> dict[str, Any]:
        return {"k": self.k, **super().config()}


class CosFace(MarginHead):
    """Additive cosine margin (large margin cosine loss)."""

    def __init__(self, in_features: int, n_classes: int, s: float = 30.0, m: float = 0.3,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(in_features, n_classes, label_smoothing)
        self.s, self.m = float(s), float(m)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = cosine_logits(x, self.weight).float()
        return cos * self.s if labels is None else cosface_logits(cos, labels, self.s, self.m)

    def config(self) -> dict[str, Any]:
        return {"s": self.s, "m": self.m, "label_smoothing": self.label_smoothing}

    def set_scale_margin(self, s: float | None = None, m: float | None = None) -> None:
        if m is not None:
            self.m = float(m)
        if s is not None:
            self.s = float(s)


class AdaCos(MarginHead):
    """Margin-free cosine softmax with an adaptive scale held in the persistent buffer ``s``.

    In training mode, with labels and ``dynamic``, ``s`` is updated from the batch before the
    logits are computed. Under DDP the default ``broadcast_buffers=True`` keeps rank 0's ``s``.
    """

    def __init__(self, in_features: int, n_classes: int, dynamic: bool = True, theta_zero: float = math.pi / 4,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(in_features, n_classes, label_smoothing)
        self.dynamic, self.theta_zero = bool(dynamic), float(theta_zero)
        self.register_buffer("s", torch.tensor(adacos_fixed_scale(self.n_classes, self.theta_zero)), persistent=True)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = cosine_logits(x, self.weight).float()
        s = self.s.clone()  # a fresh tensor, so a later in-place update cannot break this graph's backward
        if self.training and self.dynamic and labels is not None:
            s = adacos_dynamic_scale(cos, labels, s)
            self.s.copy_(s)
        return cos * s

    def config(self) -> dict[str, Any]:
        return {"dynamic": self.dynamic, "theta_zero": self.theta_zero, "label_smoothing": self.label_smoothing}


HEADS: dict[str, type[MarginHead]] = {
    "arcface": ArcFace, "cosface": CosFace, "adacos": AdaCos, "subcenter_arcface": SubCenterArcFace,
    "softmax": SoftmaxHead,
}


def create_head(name: str, in_features: int, n_classes: int, **kwargs: Any) -> MarginHead:
    """A head by name; ``None`` kwargs are ignored (timm's habit)."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose from {sorted(HEADS)}")
    return HEADS[name](in_features, n_classes, **{k: v for k, v in kwargs.items() if v is not None})


def convert_head(head: MarginHead, name: str, **kwargs: Any) -> MarginHead:
    """A head of kind ``name`` that starts from ``head``'s class rows: a stage switching from a margin
    head to the plain classifier (GUIE 2022 5th place) keeps what the earlier stage learned."""
    new = create_head(name, head.in_features, head.n_classes, **kwargs)
    if new.weight.shape != head.weight.shape:
        raise ValueError(f"cannot switch {type(head).__name__} {tuple(head.weight.shape)} to {name} "
                         f"{tuple(new.weight.shape)}: the class rows differ (sub-centres?)")
    with torch.no_grad():
        new.weight.copy_(head.weight)
    return new.to(head.weight.device)
