"""ViT and open_clip backbones: the adapters equal their libraries' forward, any input size, token poolings."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CLIP, TINY_HYBRID, TINY_VIT
from retrieval.extract import MULTI_SCALES, describe
from retrieval.models import create_model, load_checkpoint, save_checkpoint
from retrieval.models.backbones import backbone_blocks, create_backbone
from retrieval.models.pooling import avg_tokens, cls_token, gem_tokens
from retrieval.models.vit import CLIP_MEAN, fit_to_grid, grid_length, resample_pos_embed


def test_timm_vit_equals_timm_at_its_size_and_takes_any_size():
    torch.manual_seed(0)
    net = create_model(**TINY_VIT, pooling="cls").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(net.backbone.forward_features(x), net.backbone.vit.forward_features(x), atol=1e-6)
        for h, w in ((70, 99), (32, 32), (200, 64)):  # resized to the patch grid, positions resampled
            v = net(torch.randn(1, 3, h, w))
            assert v.shape == (1, 64) and torch.allclose(v.norm(dim=1), torch.ones(1), atol=1e-4)
    assert net.meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
    ms = describe(net, torch.randn(2, 3, 96, 128), MULTI_SCALES)  # 1, 1/√2, 1/2: none a patch multiple
    assert ms.shape == (2, 64) and torch.allclose(ms.norm(dim=1), torch.ones(2), atol=1e-4)


def test_timm_hybrid_vit_runs_its_cnn_stem_and_takes_any_size():
    torch.manual_seed(0)  # R+ViT-Ti/S16 p8: a ResNet stem (stride 4), 8x8 patches of its map: 32-px patches
    net = create_model("vit_tiny_r_s16_p8_224", pretrained=None, pooling="cls",
                       backbone_kwargs={"depth": 1, "img_size": 64}).eval()
    assert net.backbone.patch_size == 32 and net.backbone.pos_grid == (2, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(net.backbone.forward_features(x), net.backbone.vit.forward_features(x), atol=1e-6)
        assert net.backbone.forward_features(torch.randn(1, 3, 100, 70)).shape == (1, 1 + 3 * 2, 192)
    with pytest.raises(ValueError, match="patch_stride is not supported for hybrid ViTs"):
        net.set_patch_stride(16)


def test_hybrid_over_a_cnn_starts_as_its_projected_map_and_freezes_by_cnn_blocks(tmp_path):
    torch.manual_seed(0)
    net = create_model(**TINY_HYBRID, pooling="gem_tokens", fc_dim=16, neck_bn=False).eval()
    vit, cnn = net.backbone.vit, net.backbone.vit.patch_embed.backbone
    assert net.backbone.patch_size == 32 and net.backbone.num_prefix_tokens == 0 and net.meta["dim"] == 16
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        tokens = net.backbone.forward_features(x)
        assert torch.allclose(tokens, vit.forward_features(x), atol=1e-6)  # timm's own forward at its size
        projected = vit.patch_embed.proj(cnn.forward_features(x)).flatten(2).transpose(1, 2) + vit.pos_embed
        assert (tokens - projected).norm() < 1e-3 * projected.norm()  # LayerScale 1e-5: blocks start as identity
        assert net.backbone.forward_features(torch.randn(1, 3, 100, 70)).shape == (1, 3 * 2, 32)
        ms = describe(net, torch.randn(2, 3, 96, 128), MULTI_SCALES)
        assert ms.shape == (2, 16) and torch.allclose(ms.norm(dim=1), torch.ones(2), atol=1e-4)
    stem, blocks = backbone_blocks(net.backbone)
    assert len(blocks) == len(cnn.blocks) + 2  # the CNN's blocks (its conv_head joined to the last), the ViT's
    frozen = {id(p) for part in [*stem, *blocks[:len(cnn.blocks)]] for p in part.parameters()}
    assert {id(p) for p in cnn.parameters()} == frozen
    rebuilt = load_checkpoint(save_checkpoint(tmp_path / "hybrid.pth", net)).eval()
    assert rebuilt.meta["architecture"] == "hybrid:test_efficientnet"
    with torch.inference_mode():
        assert torch.allclose(rebuilt(x), net(x), atol=1e-6)


def test_hybrid_cnn_keeps_its_shipped_imagenet_weights():
    net = create_model("hybrid:tf_efficientnet_lite0", pretrained="efficientnet_lite0", pooling="gem_tokens",
                       backbone_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    trunk = net.backbone.vit.patch_embed.backbone.state_dict()
    reference = create_backbone("tf_efficientnet_lite0", "efficientnet_lite0").state_dict()
    assert trunk.keys() == reference.keys() and all(torch.equal(trunk[k], reference[k]) for k in reference)
    assert net.meta["mean"] == [0.5, 0.5, 0.5] and net.meta["pretrained"] == "efficientnet_lite0"
    with pytest.raises(ValueError, match="is for tf_efficientnet_lite0, not resnet18"):
        create_model("hybrid:resnet18", pretrained="efficientnet_lite0", pooling="gem_tokens")
    with pytest.raises(ValueError, match="patch_size is fixed for a hybrid ViT"):
        create_model("hybrid:test_efficientnet", pretrained=None, pooling="gem_tokens",
                     backbone_kwargs={"patch_size": 2})


def test_open_clip_tower_cls_pooling_is_the_clip_image_embedding():
    torch.manual_seed(0)
    net = create_model(**TINY_CLIP, pooling="cls").eval()
    assert net.meta["dim"] == 32 and net.meta["mean"] == pytest.approx(list(CLIP_MEAN))
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        clip = net.backbone.visual(x)  # open_clip's own forward: class token → ln_post → proj
        assert torch.allclose(net.pool(net.backbone.forward_features(x)), clip, atol=1e-5)
        net.set_patch_stride(10)  # overlapping patches: (58 − 14) / 10 + 1 → a 5x5 grid of a 54-px image
        assert net.backbone.forward_features(torch.randn(1, 3, 58, 58)).shape == (1, 1 + 25, 32)
    assert net.meta["patch_stride"] == 10
    with pytest.raises(ValueError, match="patch_stride must be in"):
        net.set_patch_stride(15)


def test_patch_grid_rounding_and_position_resampling():
    assert [grid_length(n, 16, 16) for n in (64, 70, 72, 8)] == [4, 4, 5, 1]
    assert grid_length(290, 14, 10) == 29 and grid_length(224, 14, 10) == 22
    assert fit_to_grid(torch.zeros(1, 3, 70, 99), 16, 16).shape[-2:] == (64, 96)
    assert fit_to_grid(torch.zeros(1, 3, 290, 290), 14, 10).shape[-2:] == (294, 294)
    pos = torch.cat([torch.full((1, 1, 8), -1.0), torch.full((1, 16, 8), 0.5)], dim=1)
    out = resample_pos_embed(pos, (4, 4), (6, 3), 1)
    assert out.shape == (1, 1 + 18, 8) and torch.equal(out[:, :1], pos[:, :1])
    assert torch.allclose(out[:, 1:], torch.full((1, 18, 8), 0.5), atol=1e-6)  # a constant stays constant
    assert resample_pos_embed(pos, (4, 4), (4, 4), 1) is pos


def test_token_poolings_closed_form_and_backbone_fit():
    x = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0]]])  # a class token, then 2 patch tokens
    assert torch.equal(cls_token(x), torch.tensor([[9.0, 9.0]]))
    assert torch.equal(avg_tokens(x, 1), torch.tensor([[2.0, 3.0]]))
    assert torch.allclose(gem_tokens(x, 1.0, num_prefix_tokens=1), avg_tokens(x, 1))
    assert gem_tokens(x, 3.0, num_prefix_tokens=1)[0, 0] == pytest.approx(((1 + 27) / 2) ** (1 / 3), rel=1e-5)
    with pytest.raises(ValueError, match="does not fit vit_tiny_patch16_224"):
        create_model(**TINY_VIT, pooling="gem")
    with pytest.raises(ValueError, match="does not fit test_efficientnet"):
        create_model("test_efficientnet", pretrained=None, pooling="cls")


def test_vit_checkpoint_rebuilds_with_its_kwargs_stride_and_resolutions(tmp_path):
    torch.manual_seed(1)
    net = create_model(**TINY_VIT, pooling="gem_tokens", fc_dim=16, neck_bn=False, dropout=0.2, patch_stride=12,
                       resolutions=[48, 64]).eval()
    assert net.meta["dim"] == 32 and net.gem_p == pytest.approx(3.0)  # two 16-d descriptors concatenated
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        v = net(x)
        parts = [net.describe(torch.nn.functional.interpolate(x, size=s, mode="bilinear", align_corners=False))
                 for s in ((38, 48), (51, 64))]
        assert torch.allclose(v, torch.cat(parts, 1) / 2 ** 0.5, atol=1e-6)
    rebuilt = load_checkpoint(save_checkpoint(tmp_path / "vit.pth", net)).eval()
    assert rebuilt.meta["patch_stride"] == 12 and rebuilt.meta["backbone_kwargs"]["depth"] == 2
    assert not hasattr(rebuilt.neck.bn, "weight")  # no BatchNorm in the projection
    with torch.inference_mode():
        assert torch.allclose(rebuilt(x), v, atol=1e-6)
    mean = create_model(**TINY_VIT, pooling="cls", resolutions=[48, 64], resolution_combine="mean")
    assert mean.meta["dim"] == 64


def test_open_clip_weights_from_a_clip_checkpoint_file(tmp_path):
    torch.manual_seed(2)
    donor = create_model(**TINY_CLIP, pooling="cls")
    state = {f"visual.{k}": v for k, v in donor.backbone.visual.state_dict().items()}
    state["text_projection"] = torch.zeros(4, 4)  # a whole CLIP checkpoint: only visual.* is taken
    torch.save({"state_dict": state}, tmp_path / "clip.bin")
    net = create_model(**{**TINY_CLIP, "pretrained": str(tmp_path / "clip.bin")}, pooling="cls")
    for k, v in donor.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k
    with pytest.raises(ValueError, match=r"clip\.bin: positional_embedding is"):
        create_model(**{**TINY_CLIP, "pretrained": str(tmp_path / "clip.bin"),
                        "backbone_kwargs": {**TINY_CLIP["backbone_kwargs"], "image_size": 70}}, pooling="cls")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_model("open_clip:ViT-Nope", pretrained=None, pooling="cls")


@pytest.mark.parametrize("spec, n_blocks", [(TINY_VIT, 2), (TINY_CLIP, 2)])
def test_vit_stem_holds_position_embedding_and_class_token(spec, n_blocks):
    net = create_model(**spec, pooling="cls")
    stem, blocks = backbone_blocks(net.backbone)
    assert len(blocks) == n_blocks
    names = {id(p): n for n, p in net.backbone.named_parameters()}
    frozen = set()
    for part in stem:
        params = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
        frozen |= {names[id(p)] for p in params}
    assert any("pos" in n for n in frozen) and any("cls" in n or "class" in n for n in frozen)
