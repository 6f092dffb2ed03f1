"""Global pooling: of CNN feature maps (GeM, MAC, SPoC, R-MAC), of ViT tokens (class token, mean, GeM), L2N.

Maths lives in the functions; the modules only own parameters (cirtorch's split).
Feature-map poolings map ``(B, C, H, W)`` to ``(B, C)``; token poolings map ViT tokens
``(B, P + N, C)`` (P prefix tokens, then N patch tokens) to ``(B, C)`` and are built with the
backbone's ``num_prefix_tokens`` (`TOKEN_POOLINGS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rows scaled to unit L2 norm."""
    return x / (x.norm(p=2, dim=-1, keepdim=True) + eps)


def mac(x: torch.Tensor) -> torch.Tensor:
    """Max over spatial positions (Tolias et al., ICLR 2016)."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooling (average) over spatial positions (Babenko & Lempitsky, ICCV 2015)."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6,
        dim: int | tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Generalised mean: (mean x^p)^(1/p) over ``dim`` (Radenović et al., TPAMI 2018); p=1 is SPoC, p→∞ MAC."""
    return x.clamp(min=eps).pow(p).mean(dim=dim).pow(1.0 / p)


def cls_token(x: torch.Tensor) -> torch.Tensor:
    """The class token of ViT tokens ``(B, P + N, C)`` (the first prefix token)."""
    return x[:, 0]


def avg_tokens(x: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Mean of the patch tokens (the prefix tokens left out)."""
    return x[:, num_prefix_tokens:].mean(dim=1)


def gem_tokens(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6,
               num_prefix_tokens: int = 1) -> torch.Tensor:
    """GeM over the patch tokens (negative activations clamp to ``eps``, as GeM does on maps)."""
    return gem(x[:, num_prefix_tokens:], p, eps, dim=1)


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int]]:
    """Square regions ``(top, left, side)`` of R-MAC's multi-scale grid (Tolias et al., ICLR 2016).

    Level ``l`` uses squares of side ``2·min(H, W)/(l+1)``; along the long side the number of
    extra regions is chosen so neighbours overlap by about ``overlap``.
    """
    short, long_ = min(height, width), max(height, width)
    extra = 0
    if height != width:
        steps = torch.arange(2, 8, dtype=torch.float64)
        b = (long_ - short) / (steps - 1)
        extra = int(torch.argmin(((short**2 - short * b) / short**2 - overlap).abs())) + 1
    extra_w, extra_h = (extra, 0) if width > height else (0, extra)
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        n_w, n_h = level + extra_w, level + extra_h
        step_w = 0.0 if n_w == 1 else (width - side) / (n_w - 1)
        step_h = 0.0 if n_h == 1 else (height - side) / (n_h - 1)
        for i in range(n_h):
            for j in range(n_w):
                regions.append((math.floor(i * step_h), math.floor(j * step_w), side))
    return regions


def rmac(x: torch.Tensor, levels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """Sum of L2-normalised MACs of the whole map and of the R-MAC regions."""
    out = l2n(mac(x), eps)
    for top, left, side in rmac_regions(x.shape[-2], x.shape[-1], levels):
        out = out + l2n(mac(x[..., top:top + side, left:left + side]), eps)
    return out


class GeM(nn.Module):
    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)])) if learnable else float(p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    @property
    def p_value(self) -> float:
        return float(self.p.detach()) if isinstance(self.p, torch.Tensor) else float(self.p)

    def extra_repr(self) -> str:
        return f"p={self.p_value:.4f}, eps={self.eps}"


class MAC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mac(x)


class SPoC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spoc(x)


class RMAC(nn.Module):
    def __init__(self, levels: int = 3, eps: float = 1e-6) -> None:
        super().__init__()
        self.levels, self.eps = levels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmac(x, self.levels, self.eps)


class ClsToken(nn.Module):
    def __init__(self, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if num_prefix_tokens < 1:
            raise ValueError("cls pooling needs a backbone with a class token (num_prefix_tokens >= 1)")
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cls_token(x)


class AvgTokens(nn.Module):
    def __init__(self, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_tokens(x, self.num_prefix_tokens)


class GeMTokens(GeM):
    """GeM over patch tokens; a `GeM` (its p is the multi-scale power too)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True, num_prefix_tokens: int = 1) -> None:
        super().__init__(p, eps, learnable)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem_tokens(x, self.p, self.eps, self.num_prefix_tokens)


POOLINGS: dict[str, Callable[..., nn.Module]] = {
    "gem": GeM, "mac": MAC, "spoc": SPoC, "rmac": RMAC, "cls": ClsToken, "avg_tokens": AvgTokens,
    "gem_tokens": GeMTokens,
}
TOKEN_POOLINGS = ("cls", "avg_tokens", "gem_tokens")
GEM_POOLINGS = ("gem", "gem_tokens")  # take ``p``


def create_pooling(name: str, **kwargs) -> nn.Module:
    """A pooling module by name; ``None`` kwargs are ignored (timm's habit)."""
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose from {sorted(POOLINGS)}")
    return POOLINGS[name](**{k: v for k, v in kwargs.items() if v is not None})
