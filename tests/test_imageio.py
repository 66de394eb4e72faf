"""imageio: every image enters the engine as upright 8-bit RGB, or is rejected with a reason."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from imagefiles import noise, png_claiming_size
from PIL import Image

from bgminer.imageio import ImageRejected, load_rgb, make_thumbnail, read_image, to_tensor_uint8


def test_transparent_pixels_are_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 5, 5))
    rgba.save(tmp_path / "a.png")
    img = load_rgb(tmp_path / "a.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (0, 0, 255)
    assert img.getpixel((19, 9)) == (255, 255, 255)


def test_palette_transparency_is_composited_onto_white(tmp_path):
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    img = load_rgb(tmp_path / "p.png")
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 1)) == (255, 0, 0)


def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path):
    Image.fromarray(np.full((6, 8), 0x8000, np.uint16)).save(tmp_path / "g16.png")
    img = load_rgb(tmp_path / "g16.png")
    assert img.size == (8, 6)
    assert img.getpixel((0, 0)) == (128, 128, 128)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (12, 12), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert load_rgb(tmp_path / "anim.gif").getpixel((5, 5)) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    r, g, b = load_rgb(tmp_path / "c.jpg").getpixel((8, 8))
    assert r > 150 and g < 80 and b < 80


def test_exif_orientation_is_applied_and_reported(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(noise(40, 100)).save(tmp_path / "o.jpg", exif=exif)
    decoded = read_image(tmp_path / "o.jpg")
    assert decoded.image.size == (40, 100)
    assert decoded.source_size == (40, 100)


def test_draft_decodes_large_jpegs_at_reduced_scale_but_not_below_draft_size(tmp_path):
    Image.fromarray(noise(1000, 2000)).save(tmp_path / "big.jpg")
    decoded = read_image(tmp_path / "big.jpg", draft_size=256)
    assert decoded.source_size == (2000, 1000)
    assert min(decoded.image.size) >= 256
    assert decoded.image.size[0] < 2000


def test_tensor_is_uint8_channels_first_with_the_same_pixels():
    arr = noise(5, 7)
    t = to_tensor_uint8(Image.fromarray(arr))
    assert t.dtype == torch.uint8
    assert tuple(t.shape) == (3, 5, 7)
    assert np.array_equal(t.permute(1, 2, 0).numpy(), arr)


def test_thumbnail_is_a_jpeg_whose_long_side_fits():
    data = make_thumbnail(Image.fromarray(noise(300, 600)), size=128)
    thumb = Image.open(io.BytesIO(data))
    assert thumb.format == "JPEG"
    assert thumb.size == (128, 64)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "empty_file"),
        ("notes.jpg", b"just some text, honestly\n" * 4, "not_an_image"),
        ("bomb.png", png_claiming_size(50_000, 50_000), "too_large"),
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
    ],
)
def test_bad_bytes_are_rejected_with_a_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageRejected) as err:
        load_rgb(tmp_path / name)
    assert err.value.reason == reason


def test_truncated_jpeg_is_rejected_as_truncated(tmp_path):
    Image.fromarray(noise(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageRejected) as err:
        load_rgb(tmp_path / "cut.jpg")
    assert err.value.reason == "truncated"


def test_formats_outside_the_accepted_list_are_unsupported(tmp_path):
    Image.fromarray(noise(16, 16)).save(tmp_path / "icon.ico")
    with pytest.raises(ImageRejected) as err:
        load_rgb(tmp_path / "icon.ico")
    assert err.value.reason == "unsupported_format"
    assert "ICO" in err.value.detail


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    Image.fromarray(noise(300, 300)).save(tmp_path / "a.png")
    with pytest.raises(ImageRejected) as err:
        load_rgb(tmp_path / "a.png", max_pixels=50_000)
    assert err.value.reason == "too_large"


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(ImageRejected) as err:
        load_rgb(tmp_path / "nope.png")
    assert err.value.reason == "unreadable"


def test_rejection_survives_pickling_between_processes():
    err = pickle.loads(pickle.dumps(ImageRejected("corrupt", "bad data")))
    assert (err.reason, err.detail) == ("corrupt", "bad data")
