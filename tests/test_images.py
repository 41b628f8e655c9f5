"""Image decoding: every mode and format to uint8 RGB, and clear refusals of bad input."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.images import (
    ImageError,
    decode_image,
    load_image,
    load_mask,
    resize_rgb,
    to_tensor,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(mode: str, colour, size=(32, 24)) -> Image.Image:
    return Image.new(mode, size, colour)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_rgb_roundtrip(fmt: str) -> None:
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(Image.fromarray(RGB), fmt, **kw))
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, RGB)


def test_jpeg_close_to_source() -> None:
    out = decode_image(encode(solid("RGB", (200, 100, 50)), "JPEG", quality=95))
    assert np.abs(out.astype(int) - [200, 100, 50]).max() <= 3


@pytest.mark.parametrize(
    ("im", "fmt", "expected"),
    [
        (solid("L", 77), "PNG", (77, 77, 77)),
        (solid("1", 1), "PNG", (255, 255, 255)),
        (solid("1", 1), "BMP", (255, 255, 255)),
        (solid("RGB", (200, 100, 50)).convert("P"), "PNG", (204, 102, 51)),
        (solid("RGB", (200, 100, 50)).convert("P"), "GIF", (204, 102, 51)),
        (solid("RGBA", (200, 100, 50, 255)), "PNG", (200, 100, 50)),
        (solid("RGBA", (200, 100, 50, 0)), "PNG", (0, 0, 0)),  # transparent -> black
        (solid("RGBA", (200, 100, 50, 128)), "PNG", (100, 50, 25)),
        (solid("LA", (200, 255)), "PNG", (200, 200, 200)),
        (solid("LA", (200, 0)), "PNG", (0, 0, 0)),
        (solid("RGB", (200, 100, 50)).convert("YCbCr"), "JPEG", (200, 100, 50)),
    ],
)
def test_modes_to_rgb(im: Image.Image, fmt: str, expected) -> None:
    out = decode_image(encode(im, fmt))
    assert out.shape == (24, 32, 3)
    assert np.abs(out[5, 5].astype(int) - expected).max() <= 2


def test_cmyk_jpeg() -> None:
    cmyk = solid("RGB", (200, 100, 50)).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert np.abs(decode_image(data)[5, 5].astype(int) - (200, 100, 50)).max() <= 4


def test_palette_with_transparency() -> None:
    im = Image.new("P", (32, 24), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.paste(0, (0, 0, 16, 24))
    out = decode_image(encode(im, "PNG", transparency=1))
    assert tuple(out[0, 20]) == (0, 0, 0)  # transparent index -> black
    opaque = decode_image(encode(im, "PNG"))
    assert tuple(opaque[0, 20]) == (10, 200, 30)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grey_scales_by_bit_depth(fmt: str) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(8, 0).repeat(4, 1)
    out = decode_image(encode(Image.fromarray(values), fmt))
    assert out[0, ::4, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_16bit_big_endian_tiff() -> None:
    arr = np.full((8, 8), 32768, dtype=">u2")
    im = Image.frombytes("I;16B", (8, 8), arr.tobytes())
    assert decode_image(encode(im, "TIFF"))[0, 0].tolist() == [128, 128, 128]


def test_int32_and_float_tiff() -> None:
    as_int = Image.fromarray(np.full((8, 8), 65535, dtype=np.int32))
    assert decode_image(encode(as_int, "TIFF"))[0, 0, 0] == 255
    as_float = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert decode_image(encode(as_float, "TIFF"))[0, 0, 0] == 128


def test_animated_gif_and_apng_first_frame() -> None:
    frames = [solid("RGB", (255, 0, 0)), solid("RGB", (0, 0, 255))]
    for fmt in ("GIF", "PNG"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        assert tuple(decode_image(data)[3, 3]) == (255, 0, 0), fmt


def test_exif_orientation_applied() -> None:
    im = Image.fromarray(RGB)  # 32 wide, 24 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(im, "JPEG", exif=exif, quality=95))
    assert out.shape == (32, 24, 3)


def _bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` zeros, a few tens of kB on disk."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    comp = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png())
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match=r"bomb\.png: .*decompression bomb"):
        load_image(path)
    # Pillow's hard limit is not needed for our own: a modest size over our limit is refused too.
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(encode(Image.fromarray(RGB), "PNG"), max_pixels=500)
    with pytest.raises(ImageError, match="32"):
        decode_image(encode(Image.fromarray(RGB), "PNG"), max_side=31)


def test_pillow_global_state_untouched() -> None:
    limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(_bomb_png(12000))  # between Pillow's warning and error limits
    assert (limit, filters) == (Image.MAX_IMAGE_PIXELS, list(warnings.filters))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_refused(tmp_path: Path, fmt: str, keep: float) -> None:
    data = encode(Image.fromarray(RGB), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError, match=rf"cut\.{fmt.lower()}"):
        load_image(path)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"", "empty"),
        (RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a recognisable image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a recognisable image"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "not a recognisable image"),
    ],
)
def test_garbage_refused(data: bytes, what: str) -> None:
    with pytest.raises(ImageError, match=rf"^camera-7\.png: .*{what}"):
        decode_image(data, source="camera-7.png")


def test_too_small_refused() -> None:
    with pytest.raises(ImageError, match="4x4"):
        decode_image(encode(solid("RGB", 0, (4, 4)), "PNG"))


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nope\.png: does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    assert issubclass(ImageError, ValueError)


def test_load_mask(tmp_path: Path) -> None:
    assert not load_mask(None, (5, 7)).any() and load_mask(None, (5, 7)).shape == (5, 7)
    m = np.zeros((24, 32), np.uint8)
    m[4:8, 4:12] = 1  # VisA-style small non-zero values count as defect
    Image.fromarray(m).save(tmp_path / "m.png")
    got = load_mask(tmp_path / "m.png", (24, 32))
    assert got.dtype == bool and got.sum() == 32
    half = load_mask(tmp_path / "m.png", (12, 16))
    assert half.shape == (12, 16) and half.sum() == 8
    Image.fromarray(m * 255).convert("1").save(tmp_path / "m1.png")
    assert load_mask(tmp_path / "m1.png", (24, 32)).sum() == 32
    with pytest.raises(ImageError, match="absent"):
        load_mask(tmp_path / "absent.png", (24, 32))


def test_resize_and_tensor() -> None:
    small = resize_rgb(RGB, (12, 16))
    assert small.shape == (12, 16, 3) and small.dtype == np.uint8
    assert resize_rgb(RGB, (24, 32)) is RGB
    t = to_tensor(RGB)
    assert t.dtype == torch.float32 and t.shape == (3, 24, 32)
    assert torch.allclose(t[:, 0, 0] * 255, torch.tensor(RGB[0, 0], dtype=torch.float32))
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(RGB.astype(np.float32))
