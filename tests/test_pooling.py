import math

import pytest
import torch

from retrieval.models import GeM, create_pooling, gem, l2n, mac, rmac, rmac_regions, spoc


def test_gem_closed_form():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    assert gem(x, 3.0).item() == pytest.approx(expected, rel=1e-6)
    assert gem(x, 1.0).item() == pytest.approx(spoc(x).item())  # p = 1 is average pooling
    assert gem(x, 60.0).item() == pytest.approx(mac(x).item(), rel=3e-2)  # large p tends to max


def test_gem_clamps_negatives_and_learns_p():
    x = torch.randn(2, 5, 4, 3)
    pool = GeM(p=3.0)
    out = pool(x)
    assert out.shape == (2, 5) and (out > 0).all()
    out.sum().backward()
    assert pool.p.grad is not None and list(pool.p.shape) == [1]
    assert GeM(learnable=False).p == 3.0


def test_l2n_unit_rows():
    v = l2n(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert torch.allclose(v, torch.tensor([[0.6, 0.8], [0.0, 1.0]]), atol=1e-6)


def test_rmac_regions_square_map():
    # 6x6 map, L=3: level 1 one 6x6 region; level 2 four 4x4 at steps of 2; level 3 nine 3x3 at steps of 1.5
    regions = rmac_regions(6, 6, 3)
    assert regions[0] == (0, 0, 6)
    assert regions[1:5] == [(0, 0, 4), (0, 2, 4), (2, 0, 4), (2, 2, 4)]
    assert [r[2] for r in regions[5:]] == [3] * 9 and regions[5:8] == [(0, 0, 3), (0, 1, 3), (0, 3, 3)]


def test_rmac_regions_wide_map_adds_columns():
    regions = rmac_regions(4, 8, 1)
    assert all(side == 4 and top == 0 for top, _, side in regions)
    assert len(regions) > 1 and regions[-1][1] + 4 == 8  # the last region touches the right edge


def test_rmac_is_sum_of_normalised_region_maxima():
    x = torch.rand(1, 3, 6, 6)
    expected = l2n(mac(x))
    for top, left, side in rmac_regions(6, 6, 3):
        expected = expected + l2n(mac(x[..., top:top + side, left:left + side]))
    assert torch.allclose(rmac(x), expected)
    assert torch.allclose(create_pooling("rmac")(x), expected)


def test_create_pooling_registry():
    assert isinstance(create_pooling("gem", p=None), GeM)  # None kwargs ignored
    assert math.isclose(create_pooling("gem", p=4.0).p_value, 4.0)
    with pytest.raises(ValueError, match="unknown pooling 'avg'"):
        create_pooling("avg")
