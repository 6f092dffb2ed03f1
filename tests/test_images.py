from pathlib import Path

import pytest

from conftest import write_jpeg
from retrieval.data.images import ImageLoadError, load_image, resize_to


def test_load_image_rgb_and_crop(tmp_path):
    path = write_jpeg(tmp_path / "a.jpg", (64, 48))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert load_image(path, (10.4, 5.0, 30.2, 20.0)).size == (21, 15)  # floor/ceil of the box


@pytest.mark.parametrize("make, reason", [
    (lambda p: p, "missing file"),
    (lambda p: p.write_bytes(b""), "zero-byte file"),
    (lambda p: p.write_text("this is not an image\n"), "not an image"),
])
def test_bad_files_raise_one_line_reasons(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageLoadError, match=reason):
        load_image(path)


def test_truncated_jpeg_is_an_error(tmp_path):
    good = write_jpeg(tmp_path / "good.jpg", (256, 256))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(cut)


def test_empty_crop_box_is_an_error(tmp_path):
    path = write_jpeg(tmp_path / "a.jpg", (64, 48))
    with pytest.raises(ImageLoadError, match="empty crop box"):
        load_image(path, (70, 0, 80, 10))


def test_resize_long_side_and_square(tmp_path):
    img = load_image(write_jpeg(Path(tmp_path) / "a.jpg", (64, 48)))
    assert resize_to(img, 32).size == (32, 24)
    assert resize_to(img, 32, "square").size == (32, 32)
    assert resize_to(img, 0).size == (64, 48)
    with pytest.raises(ValueError, match="resize mode"):
        resize_to(img, 32, "crop")
