import io

import pytest
from PIL import Image

from chatapp.feedback import images
from chatapp.feedback.images import ImageError, load_image


def png_bytes(size=(32, 24), color="red", **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG", **save)
    return buf.getvalue()


def test_accepts_and_normalises(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (0, 0, 255, 128))
    path = tmp_path / "a.webp"
    rgba.save(path, "WEBP")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 10) and not out.info


def test_exif_orientation_is_applied_and_metadata_dropped(tmp_path):
    img = Image.new("RGB", (40, 20), "green")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "rot.jpg"
    img.save(path, "JPEG", exif=exif.tobytes())
    out = load_image(path)
    assert out.size == (20, 40)
    assert not out.getexif()


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, I am text", "not an image"),
    (png_bytes()[:60], "truncated or damaged"),
    (b"%PDF-1.4 not an image", "not an image"),
])
def test_refusals(tmp_path, data, message):
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=message):
        load_image(path)


def test_pixel_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (12000, 9000)).save(path, "PNG")  # tiny file, 108 megapixels
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match="too large|too many pixels"):
        load_image(path)


def test_oversized_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes((64, 64)) + b"\0" * 200)
    with pytest.raises(ImageError, match="limit"):
        load_image(path)


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("P", (8, 8), i) for i in (1, 2)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(path).size == (8, 8)
