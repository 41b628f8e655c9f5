"""Robust image and mask input: decode untrusted files into uint8 RGB arrays, or refuse them clearly.

Every failure raises :class:`ImageError`, whose message names the file, says what is wrong and what to do.

Decisions worth knowing:

* Only PNG, JPEG (incl. multi-picture MPO), BMP, TIFF, GIF and WebP are opened; other Pillow plugins (EPS, PSD, ...) are
  never tried, which keeps the attack surface small.
* Decompression bombs are refused from the header size, before any pixel is decoded.  Pillow's own
  ``DecompressionBombWarning`` is silenced for the call (our limits replace it); its hard
  ``DecompressionBombError`` (above ``2 * Image.MAX_IMAGE_PIXELS``) is reported as an ``ImageError``.
  No global Pillow setting is changed; only the ``warnings`` filters are touched, inside
  ``warnings.catch_warnings()``.
* Truncated files are refused (``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay off: decoding refuses to run
  when something in the process turned it on). PNGs are additionally checked chunk by chunk up to ``IEND``,
  and their image data must inflate to every row the header declares: Pillow fills missing rows with zeros
  when the compressed stream ends early. (A JPEG cut short with an end marker appended is still concealed by
  libjpeg, which Pillow does not report.)
* Transparency is composited onto black: transparent pixels become black, so colours hidden under
  alpha cannot leak into features.  Fully opaque images are unchanged.
* High-bit-depth grey (``I;16*``) is scaled by its declared bit depth (16, or TIFF ``BitsPerSample``) to
  8 bit with rounding: 65535 -> 255, 32768 -> 128.  32-bit ``I`` is read as 16-bit data when its values fit,
  else as 32-bit.  Float ``F`` is taken as [0, 1] when its maximum is <= 1, else [0, 255], else [0, 65535],
  else scaled by its maximum; NaN becomes 0.
* Animated GIF/APNG and multi-page TIFF: the first frame.  EXIF orientation is applied; broken EXIF
  data is ignored rather than rejecting an otherwise good image.
"""

from __future__ import annotations

import contextlib
import io
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

__all__ = [
    "ImageError",
    "decode_image",
    "decode_mask",
    "image_size",
    "load_image",
    "load_mask",
    "read_bytes",
    "resize_mask",
    "resize_rgb",
    "to_tensor",
]

FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")  # JPEG also opens multi-picture (MPO) files
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_MAX_FILE_BYTES = 512 * 2**20
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


class ImageError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the remedy."""


def _fail(source: str, problem: str, remedy: str) -> ImageError:
    return ImageError(f"{source}: {problem}; {remedy}")


def _check_size(size: tuple[int, int], source: str, max_pixels: int, max_side: int, min_side: int) -> None:
    """Refuse a declared (width, height) outside the limits, before any pixel is decoded."""
    w, h = size
    if w * h > max_pixels or max(w, h) > max_side:
        raise _fail(
            source,
            f"declares {w}x{h} pixels, above the limit of {max_pixels} pixels / {max_side} px per side "
            "(possible decompression bomb)",
            "downscale the image, or raise max_pixels/max_side if it is genuine",
        )
    if min(w, h) < min_side:
        raise _fail(source, f"is only {w}x{h} pixels", f"images need at least {min_side} px per side")


def _verify_png(data: bytes, source: str) -> None:
    """Walk every PNG chunk with its CRC up to IEND; catches half-written files whose pixels still decode."""
    if _PNG_IEND not in data:
        raise _fail(source, "is a truncated PNG (no IEND chunk)", "re-copy or re-export the file")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            im.verify()
    except Exception as exc:
        raise _fail(
            source, f"is a truncated or corrupt PNG ({exc})", "re-copy or re-export the file"
        ) from exc
    _check_png_rows(data, source)


def _png_chunks(data: memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """(type, payload) of each chunk after the signature (lengths past the end give a short payload)."""
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        yield bytes(data[pos + 4 : pos + 8]), data[pos + 8 : pos + 8 + length]
        pos += 12 + length


def _png_raw_size(ihdr: memoryview) -> int:
    """Bytes of filtered scanlines the IHDR declares (every Adam7 pass when interlaced)."""
    w, h = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    bits = ihdr[8] * _PNG_CHANNELS.get(ihdr[9], 4)
    total = 0
    for x0, y0, dx, dy in _ADAM7 if ihdr[12] else ((0, 0, 1, 1),):
        cols, rows = -(-(w - x0) // dx), -(-(h - y0) // dy)
        if cols > 0 and rows > 0:
            total += rows * (1 + -(-cols * bits // 8))
    return total


def _check_png_rows(data: bytes, source: str) -> None:
    """The IDAT stream must inflate to every scanline the header declares (inflated 1 MiB at a time)."""
    chunks = _png_chunks(memoryview(data))
    _, ihdr = next(chunks)
    need, got, inflater = _png_raw_size(ihdr), 0, zlib.decompressobj()
    try:
        for kind, payload in chunks:
            if kind == b"IEND":
                break
            tail = payload if kind == b"IDAT" else b""
            while tail and got < need:
                got += len(inflater.decompress(tail, 2**20))
                tail = inflater.unconsumed_tail
            if got >= need:
                return
    except zlib.error as exc:
        raise _fail(source, f"is a corrupt PNG ({exc})", "re-copy or re-export the file") from exc
    raise _fail(
        source,
        f"is a truncated PNG: its image data holds {got} of the {need} bytes its header declares",
        "re-copy or re-export the file",
    )


def _open_lazy(data: bytes, source: str) -> Image.Image:
    """Open the header only (no pixel decoded yet), or raise :class:`ImageError`."""
    if not data:
        raise _fail(source, "is empty (0 bytes)", "re-copy the file; the write probably failed")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise _fail(
            source,
            "cannot be checked: PIL.ImageFile.LOAD_TRUNCATED_IMAGES was turned on in this process",
            "turn it off again; truncated files must be refused, not padded with zeros",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=list(FORMATS))
        except Image.DecompressionBombError as exc:
            raise _fail(
                source,
                f"declares more than Pillow's hard limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels "
                "(possible decompression bomb)",
                "downscale the image",
            ) from exc
        except Image.UnidentifiedImageError as exc:
            raise _fail(
                source,
                "is not a recognisable image (unknown format or corrupt header)",
                f"supply a valid {', '.join(FORMATS)} file",
            ) from exc
        except Exception as exc:
            raise _fail(
                source,
                f"is not a readable image ({type(exc).__name__}: {exc})",
                f"supply a valid {', '.join(FORMATS)} file",
            ) from exc


def image_size(
    data: bytes,
    source: str = "<bytes>",
    max_pixels: int = 40_000_000,
    max_side: int = 16384,
    min_side: int = 8,
) -> tuple[int, int]:
    """The (width, height) an image's header declares, checked against the limits of :func:`decode_image`
    without decoding a pixel; :class:`ImageError` when unreadable or outside them."""
    with _open_lazy(data, source) as im:
        _check_size(im.size, source, max_pixels, max_side, min_side)
        return im.size


def _open(
    data: bytes, source: str, max_pixels: int, max_side: int, min_side: int
) -> tuple[Image.Image, int | None]:
    """Open, size-check and fully load the first frame; EXIF orientation applied.

    Returns the image and its declared grey bit depth (TIFF ``BitsPerSample``; ``None`` otherwise), read
    before the EXIF transpose drops the format-specific attributes.
    """
    im = _open_lazy(data, source)
    _check_size(im.size, source, max_pixels, max_side, min_side)
    if im.format == "PNG":
        _verify_png(data, source)
    try:
        im.seek(0)
        im.load()
    except Exception as exc:
        raise _fail(
            source,
            f"cannot be decoded; the file is truncated or corrupt ({type(exc).__name__}: {exc})",
            "re-copy or re-export the file",
        ) from exc
    bits = _tiff_bits(im) if im.format == "TIFF" else None
    with contextlib.suppress(Exception):  # broken EXIF must not reject good pixels
        im = ImageOps.exif_transpose(im)
    return im, bits


def _tiff_bits(im: Image.Image) -> int | None:
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    bits = tags.get(258)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else None


def _high_depth_to_u8(im: Image.Image, bits: int | None) -> np.ndarray:
    """Scale an ``I;16*``, ``I`` or ``F`` single-band image to uint8 [H, W] (see module notes)."""
    arr = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        top = float(arr.max(initial=0.0))
        scale = next((s for s in (1.0, 255.0, 65535.0) if top <= s), top)
    elif im.mode.startswith("I;16"):
        scale = float(2 ** min(bits or 16, 16) - 1)
    else:  # "I": 32-bit container
        scale = 65535.0 if arr.max(initial=0) <= 65535 else float(2**32 - 1)
    out = np.clip(arr, 0.0, scale) * (255.0 / scale)
    return np.rint(out).astype(np.uint8)


def _composite_on_black(im: Image.Image) -> np.ndarray:
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def _to_rgb_array(im: Image.Image, bits: int | None, source: str) -> np.ndarray:
    """Convert a loaded Pillow image of any supported mode to uint8 [H, W, 3]."""
    mode = im.mode
    if mode in ("F", "I") or mode.startswith("I;16"):
        grey = _high_depth_to_u8(im, bits)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return _composite_on_black(im)
    try:
        rgb = im if mode == "RGB" else im.convert("RGB")
    except Exception as exc:
        raise _fail(
            source, f"has unsupported colour mode {mode!r}", "convert it to RGB or greyscale"
        ) from exc
    return np.array(rgb, dtype=np.uint8)


def decode_image(
    data: bytes,
    source: str = "<bytes>",
    max_pixels: int = 40_000_000,
    max_side: int = 16384,
    min_side: int = 8,
) -> np.ndarray:
    """Decode encoded image bytes into a writable uint8 RGB array [H, W, 3], or raise :class:`ImageError`."""
    im, bits = _open(data, source, max_pixels, max_side, min_side)
    try:
        return np.ascontiguousarray(_to_rgb_array(im, bits, source))
    finally:
        im.close()


def read_bytes(path: Path, max_bytes: int = _MAX_FILE_BYTES) -> bytes:
    """Read a whole file; missing, unreadable or oversized files raise :class:`ImageError` naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _fail(str(path), f"is {size} bytes, above the {max_bytes}-byte limit", "downscale it")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise _fail(str(path), "does not exist", "check the path and the dataset folder") from exc
    except IsADirectoryError as exc:
        raise _fail(str(path), "is a directory, not an image file", "point to an image file") from exc
    except OSError as exc:
        raise _fail(str(path), f"cannot be read ({exc.strerror or exc})", "check its permissions") from exc


def load_image(path: Path, *, max_bytes: int = _MAX_FILE_BYTES, **limits: int) -> np.ndarray:
    """Read and decode an image file (limits as in :func:`decode_image`); errors name the file."""
    return decode_image(read_bytes(path, max_bytes), source=str(path), **limits)


def _mask_to_bool(im: Image.Image) -> np.ndarray:
    """Any non-zero colour value is a defect; alpha is ignored."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    elif im.mode not in ("1", "L", "LA", "RGB", "RGBA", "F", "I") and not im.mode.startswith("I;16"):
        im = im.convert("RGB")
    arr = np.asarray(im)
    if arr.ndim == 2:
        return arr != 0
    colour = arr[..., :1] if im.mode == "LA" else arr[..., :3]
    return np.any(colour != 0, axis=2)


def decode_mask(data: bytes, source: str = "<bytes>", **limits: int) -> np.ndarray:
    """Decode mask bytes at native size into bool [H, W] (any non-zero colour = defect)."""
    im, _ = _open(data, source, limits.get("max_pixels", 40_000_000), limits.get("max_side", 16384), 1)
    try:
        return np.ascontiguousarray(_mask_to_bool(im))
    finally:
        im.close()


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask with NEAREST; returned unchanged when already ``size_hw``."""
    h, w = size_hw
    if mask.shape == (h, w):
        return mask
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(small) > 0


def load_mask(path: Path | None, size_hw: tuple[int, int], **limits: int) -> np.ndarray:
    """Load a defect mask as bool [H, W] of ``size_hw``; ``None`` gives an all-False mask."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if path is None:
        return np.zeros((h, w), dtype=bool)
    mask = decode_mask(read_bytes(path), source=str(path), **limits)
    return resize_mask(mask, (h, w))


def _check_rgb(img: np.ndarray) -> None:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        got = f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}"
        raise ValueError(f"expected a uint8 array [H, W, 3], got {got}")


def resize_rgb(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize uint8 RGB [H, W, 3] to ``size_hw`` with antialiased bilinear (Pillow); no-op when equal."""
    _check_rgb(img)
    h, w = int(size_hw[0]), int(size_hw[1])
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR)).copy()


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> float32 tensor [3, H, W] in [0, 1]."""
    _check_rgb(img)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0).contiguous()
