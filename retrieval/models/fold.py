"""Inference-time folding of BatchNorm into the convolution or linear layer that feeds it.

In eval mode a BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``,
so a conv / linear layer followed by it is one layer with ``W' = W * s`` and ``b' = (b - mean) * s + beta``,
``s = gamma / sqrt(var + eps)`` (Jacob et al. 2018, sec. 3.2). On a CPU the BatchNorm is a pass over the
whole activation map of its own: folding the 49 of EfficientNet-Lite0 halves its forward time at 480 px.

Pairs are found by running the net once on a probe image with hooks (a BatchNorm whose input is the very
output tensor of a conv / linear layer, each called once), folded in a copy of the net, and the copy is
kept only if its descriptors equal the original's on the probe; the net passed in is never changed.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
FEEDERS = (nn.Conv2d, nn.Linear)
FOLD_TOLERANCE = 1e-4  # on L2-normalised descriptors; folding itself changes them by ~1e-7


def _norm_replacement(norm: nn.Module) -> nn.Module | None:
    """What is left of ``norm`` once its affine map is folded: nothing, or timm's fused dropout + activation."""
    if type(norm) in PLAIN_NORMS:
        return nn.Identity()
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if type(norm) is BatchNormAct2d:
        return nn.Sequential(norm.drop, norm.act)
    return None


def find_foldable(net: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
    """``(feeder name, norm name)`` pairs of ``net`` (in eval mode): a BatchNorm with running statistics whose
    only call takes the output of a conv / linear layer that is itself called once in ``net(probe)``."""
    return _trace_foldable(net, probe)[0]


def _trace_foldable(net: nn.Module, probe: torch.Tensor) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """`find_foldable`'s pairs and ``net(probe)``, from the one forward pass that finds them."""
    names = {m: n for n, m in net.named_modules()}
    calls: dict[str, int] = {}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (feeder, output): kept alive so ids stay unique
    inputs: dict[str, tuple[str, ...]] = {}

    def count(module: nn.Module) -> str:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        return name

    def after_feeder(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        outputs[id(out)] = (count(module), out)

    def before_norm(module: nn.Module, args: tuple) -> None:
        name = count(module)
        fed = outputs.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
        inputs[name] = inputs.get(name, ()) + ((fed[0] if fed is not None else ""),)

    hooks = []
    for m in net.modules():
        if isinstance(m, FEEDERS):
            hooks.append(m.register_forward_hook(after_feeder))
        elif _norm_replacement(m) is not None and m.track_running_stats and not m.training:
            hooks.append(m.register_forward_pre_hook(before_norm))
    try:
        with torch.inference_mode():
            reference = net(probe)
    finally:
        for h in hooks:
            h.remove()
    pairs = []
    for norm, fed_by in inputs.items():
        feeder = fed_by[0]
        if len(fed_by) == 1 and feeder and calls.get(feeder) == 1:
            pairs.append((feeder, norm))
    return pairs, reference


@torch.no_grad()
def _fold_pair(feeder: nn.Conv2d | nn.Linear, norm: nn.Module) -> None:
    dtype = feeder.weight.dtype
    scale = norm.running_var.double().add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    bias = feeder.bias.double() * scale if feeder.bias is not None else 0.0
    weight = feeder.weight.double() * scale.reshape(-1, *([1] * (feeder.weight.dim() - 1)))
    feeder.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    feeder.bias = nn.Parameter((bias + shift).to(dtype), requires_grad=False)


def _set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def probe_input(net: nn.Module, size: int = 96) -> torch.Tensor:
    """A fixed random image ``(1, 3, size, size)`` on the net's device."""
    device = next(net.parameters()).device
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)


def fold_batchnorm(net: nn.Module, probe: torch.Tensor | None = None) -> nn.Module:
    """An eval-mode copy of ``net`` with every foldable BatchNorm folded into its conv / linear layer.

    Returns ``net`` itself (no copy) when there is nothing to fold or when the folded copy's output on
    ``probe`` (default `probe_input`) differs from the original's by more than `FOLD_TOLERANCE`.
    ``net`` must be in eval mode; it is not changed.
    """
    if net.training:
        raise ValueError("fold_batchnorm is for nets in eval mode: call net.eval() first")
    probe = probe_input(net) if probe is None else probe
    pairs, reference = _trace_foldable(net, probe)
    if not pairs:
        return net
    # a copy of the modules only: every tensor is shared, and folding rebinds the weights of the copy's layers
    folded = copy.deepcopy(net, memo={id(t): t for t in (*net.parameters(), *net.buffers())})
    for feeder, norm in pairs:
        bn = folded.get_submodule(norm)
        _fold_pair(folded.get_submodule(feeder), bn)
        _set_submodule(folded, norm, _norm_replacement(bn))
    folded.eval()
    with torch.inference_mode():
        diff = (folded(probe).float() - reference.float()).abs().max().item()
    if not diff <= FOLD_TOLERANCE:
        logger.warning("BatchNorm folding changed the descriptors by %.2g on a probe image: using the net unfolded",
                       diff)
        return net
    logger.debug("folded %d BatchNorm layers (probe difference %.2g)", len(pairs), diff)
    return folded
