"""Image reading: odd modes, EXIF rotation, damaged and over-large files."""
import numpy as np
import pytest
from PIL import Image

from ovdense.data import ImageError, load_image


def test_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (255, 0, 0, 0))  # fully transparent red -> white
    assert (load_image(rgba) == 255).all()
    gray = Image.new("L", (4, 3), 100)
    assert load_image(gray).shape == (3, 4, 3) and (load_image(gray) == 100).all()
    deep = Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    assert (load_image(tmp_path / "deep.png") == 255).all()
    assert (load_image(np.full((3, 4), 0.5, dtype=np.float32)) == 128).all()
    assert load_image(np.zeros((3, 4, 4), dtype=np.uint8)).shape == (3, 4, 3)
    assert load_image(Image.new("CMYK", (4, 3))).shape == (3, 4, 3)


def test_exif_rotation(tmp_path):
    image = Image.new("RGB", (6, 2), (0, 255, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (6, 2, 3)


def test_bad_inputs(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "text.png")
    Image.new("RGB", (200, 200), (1, 2, 3)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="megapixels"):
        load_image(tmp_path / "big.png", max_pixels=100)
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((3, 4, 2), dtype=np.uint8))
