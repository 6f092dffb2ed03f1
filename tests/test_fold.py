import logging

import numpy as np
import pytest
import torch
from torch import nn

from conftest import write_jpeg
from retrieval.data import ImageList
from retrieval.data.images import InputSize, load_image, to_tensor
from retrieval.extract import describe, extract_features
from retrieval.features import read_features
from retrieval.models import create_model
from retrieval.models.fold import find_foldable, fold_batchnorm


def random_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorms with statistics far from the identity, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return net.eval()


def norms(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("kwargs", [
    {"architecture": "tf_efficientnet_lite0"},  # conv -> timm BatchNormAct2d, depthwise convs
    {"architecture": "resnet18", "fc_dim": 32},  # conv -> BatchNorm2d, and the neck's Linear -> BatchNorm1d
])
def test_folded_net_gives_the_same_descriptors_without_batchnorms(kwargs):
    torch.manual_seed(0)
    net = random_statistics(create_model(pretrained=None, **kwargs))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    assert folded is not net and norms(net) and not norms(folded)
    x = torch.randn(3, 3, 72, 100)
    with torch.inference_mode():
        assert torch.allclose(folded(x), net(x), atol=1e-5)
        assert torch.allclose(describe(folded, x, (1.0, 0.5)), describe(net, x, (1.0, 0.5)), atol=1e-5)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert folded.meta == net.meta


def test_nothing_to_fold_returns_the_net_itself():
    net = create_model(architecture="vit_tiny_patch16_224", pooling="cls", pretrained=None).eval()
    assert fold_batchnorm(net) is net


class SkipAroundNorm(nn.Module):
    """A conv whose output also goes around its BatchNorm: folding it would change the skip branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SharedNorm(nn.Module):
    """One BatchNorm after two convs: it can be folded into neither."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.bn(self.b(x))


def test_a_fold_that_would_change_the_output_is_refused(caplog):
    net = random_statistics(SkipAroundNorm())
    assert find_foldable(net, torch.randn(1, 3, 8, 8)) == [("conv", "bn")]  # the hooks cannot see the skip...
    with caplog.at_level(logging.WARNING, logger="retrieval.models.fold"):
        assert fold_batchnorm(net) is net  # ...the check on the probe does
    assert "unfolded" in caplog.text


def test_a_shared_norm_is_not_folded():
    net = random_statistics(SharedNorm())
    assert find_foldable(net, torch.randn(1, 3, 8, 8)) == []
    assert fold_batchnorm(net) is net


def test_training_nets_are_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(SharedNorm().train())


def test_extraction_runs_the_folded_net_and_writes_the_unfolded_descriptors(tmp_path):
    torch.manual_seed(0)
    net = random_statistics(create_model(architecture="resnet18", pretrained=None))
    paths = [write_jpeg(tmp_path / f"im{i}.jpg", (64, 48), seed=i) for i in range(4)]
    images = ImageList([p.stem for p in paths], paths)
    seen = []  # batch sizes reaching the original net's first BatchNorm
    net.get_submodule(norms(net)[0]).register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    out = extract_features(net, images, tmp_path / "f.h5", image_size=64, batch_size=4, progress=False)
    assert seen == [1]  # the probe alone: the images go through the folded copy
    ids, feats, _ = read_features(out)
    size = InputSize.create(64, "long", "exact")
    with torch.inference_mode():
        for row, path in enumerate(paths):
            x = to_tensor(size.apply(load_image(path)), net.meta["mean"], net.meta["std"])[None]
            assert np.allclose(feats[row], net(x)[0].numpy(), atol=1e-5)


def test_the_copy_shares_every_tensor_it_does_not_fold():
    torch.manual_seed(0)
    net = random_statistics(create_model(architecture="resnet18", pretrained=None, fc_dim=16,
                                         head={"name": "arcface", "n_classes": 10}))
    folded = fold_batchnorm(net)
    assert folded.head.weight is net.head.weight  # the training head is not copied
    assert folded.backbone.conv1.weight is not net.backbone.conv1.weight  # a folded conv has its own weights
