"""How images are sized for the net: resize policies (cirtorch's thumbnail), aspect buckets, per-dataset defaults."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data.images import InputSize, normalize, resize_to, resolve_buckets, to_tensor, to_uint8_tensor
from retrieval.data.samplers import SIZE_TEMPLATES
from retrieval.extract import sizing_params


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)


def _cirtorch_imresize(img: Image.Image, imsize: int) -> Image.Image:
    """cirtorch.datasets.datahelpers.imresize (ANTIALIAS is LANCZOS; Pillow 10 removed the alias)."""
    img = img.copy()
    img.thumbnail((imsize, imsize), Image.LANCZOS)
    return img


# (width, height), image_size: shapes where PIL's rounding or "never enlarge" matters
AWKWARD = [((960, 333), 480), ((333, 960), 480), ((832, 767), 480), ((1231, 427), 480), ((501, 380), 512),
           ((3, 1000), 480), ((2000, 1), 480), ((480, 480), 480)]


@pytest.mark.parametrize("size, image_size", AWKWARD)
def test_cirtorch_resize_is_pil_thumbnail(size, image_size):
    img = _photo(size)
    ours, theirs = resize_to(img, image_size, "cirtorch"), _cirtorch_imresize(img, image_size)
    assert ours.size == theirs.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))  # same filter, same pixels
    assert img.size == size  # the input is left alone (thumbnail works in place)


def test_cirtorch_sizes_pinned_and_where_long_differs():
    got = {size: resize_to(_photo(size), n, "cirtorch").size for size, n in AWKWARD}
    long = {size: resize_to(_photo(size), n, "long").size for size, n in AWKWARD}
    assert got[(960, 333)] == (480, 167) and long[(960, 333)] == (480, 166)  # 166.5: PIL rounds by aspect error
    assert got[(832, 767)] == (480, 443) and long[(832, 767)] == (480, 442)
    assert got[(333, 960)] == (166, 480)  # not the transpose of (960, 333): PIL rounds width and height differently
    assert got[(501, 380)] == (501, 380) and long[(501, 380)] == (512, 388)  # smaller than image_size: never enlarged
    assert got[(3, 1000)] == (1, 480) and got[(480, 480)] == (480, 480)


def test_to_tensor_is_the_published_normalisation_bit_for_bit():
    img = _photo((37, 23), seed=3)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    expected = ((arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)
    assert torch.equal(to_tensor(img, mean, std), torch.from_numpy(np.ascontiguousarray(expected)))
    x = to_uint8_tensor(img)
    assert x.dtype == torch.uint8 and x.shape == (3, 23, 37)
    assert torch.equal(normalize(torch.stack([x, x]), mean, std)[1], to_tensor(img, mean, std))


def test_aspect_buckets_follow_image_size_and_named_sets_keep_their_sizes():
    assert resolve_buckets("exact", 320) is None and resolve_buckets(None, 320) is None
    assert resolve_buckets("aspect", 800) == SIZE_TEMPLATES["L2"]
    assert resolve_buckets("aspect", 480) == ((480, 328), (480, 368), (480, 480), (368, 480), (328, 480))
    assert resolve_buckets("L2", 320) == SIZE_TEMPLATES["L2"]  # Landmark2019's --scale L2: 800 px
    assert resolve_buckets("[[64, 48], [48, 64]]", 0) == ((64, 48), (48, 64))
    with pytest.raises(ValueError, match="scale"):
        resolve_buckets("XL", 320)


@pytest.mark.parametrize("size, bucket", [((640, 480), (480, 368)), ((640, 427), (480, 328)), ((500, 500), (480, 480)),
                                          ((480, 640), (368, 480)), ((100, 1000), (328, 480)), ((30, 20), (480, 328))])
def test_bucket_resizes_to_the_nearest_aspect_template(size, bucket):
    sizing = InputSize.create(480, "long", "aspect")
    assert sizing.apply(_photo(size)).size == bucket  # small images are enlarged to their template


def test_input_size_round_trips_through_file_attributes():
    for sizing in (InputSize.create(320, "cirtorch", "exact"), InputSize.create(320, "long", "aspect"),
                   InputSize.create(320, "long", [[64, 48], [48, 64]])):
        # as HDF5 keeps them: lists of pairs become JSON
        attrs = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in sizing.attrs().items()}
        assert InputSize.from_attrs(attrs) == sizing
    assert InputSize.from_attrs({"image_size": 64, "resize": "long"}) == InputSize(64, "long", "exact", None)
    with pytest.raises(ValueError, match="resize must be one of"):
        InputSize.create(320, "crop")


def test_auto_sizing_per_dataset_and_overrides():
    p = {"image_size": 1024, "resize": "auto", "scale": "auto"}
    assert sizing_params(p, "roxford5k") == {"image_size": 1024, "resize": "cirtorch", "scale": "exact"}
    assert sizing_params(p, "rparis6k")["resize"] == "cirtorch"
    assert sizing_params(p, "gldv2") == {"image_size": 1024, "resize": "long", "scale": "aspect"}
    assert sizing_params(p, "gldv2-full")["scale"] == "aspect"
    assert sizing_params(p, "folder:x.csv") == {"image_size": 1024, "resize": "long", "scale": "exact"}
    assert sizing_params({}, "synthetic") == {"image_size": 512, "resize": "long", "scale": "exact"}
    assert sizing_params({**p, "resize": "square"}, "roxford5k")["resize"] == "square"
    assert sizing_params(p, "roxford5k", scale="L2")["scale"] == "L2"  # predict --scale wins
