"""Turn a KServe request (V1 JSON, V2 inference request, or a raw image body) into images, or refuse it clearly.

Every refusal is a :class:`BadRequest` with a ``kind`` (counted in ``tocoad_request_errors_total``) and a
message that says what was wrong and what the server accepts, without echoing more than a few characters of
the input. Image sizes are read from the headers and checked against :class:`Limits` before any pixel is
decoded: per image, and for all the images of one request together.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from components.images import ImageError, decode_image, image_size
from serving.settings import ServingSettings

# (application/octet-stream is not one: KServe parses it as JSON before the predictor sees it)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/gif", "image/webp")
# JSON that KServe hands over undecoded because a parameter follows the type (e.g. "; charset=utf-8")
JSON_TYPES = ("application/json", "application/cloudevents+json", "application/ld+json")
MAX_ID_CHARS = 256


class BadRequest(ValueError):
    """A request the predictor refuses (HTTP 4xx); ``kind`` is the error metric's label."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Limits:
    """What one request may hold: images, pixels per image and in all, side lengths."""

    images: int
    pixels: int
    request_pixels: int
    max_side: int
    min_side: int

    @classmethod
    def for_model(cls, settings: ServingSettings, image_size: int) -> Limits:
        """The settings' limits for a model whose input is ``image_size`` px square."""
        area = image_size * image_size
        pixels = min(settings.max_pixels, int(settings.pixel_factor * area))
        return cls(settings.max_images_per_request, pixels, int(settings.request_pixel_factor * area),
                   settings.max_side, settings.min_side)  # fmt: skip


@dataclass
class Batch:
    """Decoded images of one request plus its options."""

    images: list[np.ndarray]
    protocol: str  # v1 | v2 | raw
    return_map: bool = False
    ids: list[str] = field(default_factory=list)


def short(value: Any, n: int = 40) -> str:
    """``repr(value)`` cut to ``n`` characters: enough to recognise it, never the whole input."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _refusal(exc: ImageError) -> BadRequest:
    kind = "too_large" if "decompression bomb" in str(exc) or "above the limit" in str(exc) else "decode"
    return BadRequest(kind, str(exc))


def _pixels(source: str, data: bytes, limits: Limits) -> int:
    try:
        w, h = image_size(data, source, limits.pixels, limits.max_side, limits.min_side)
    except ImageError as exc:
        raise _refusal(exc) from None
    return w * h


def decode_all(items: list[tuple[str, bytes]], limits: Limits) -> list[np.ndarray]:
    """Decode ``(source, bytes)`` items once their headers show they fit the limits, per image and in all."""
    total = sum(_pixels(source, data, limits) for source, data in items)
    if total > limits.request_pixels:
        raise BadRequest(
            "too_large",
            f"the request's {len(items)} image(s) declare {total} pixels in all, above the per-request budget "
            f"of {limits.request_pixels}; send fewer or smaller images",
        )
    try:
        return [
            decode_image(data, source, limits.pixels, limits.max_side, limits.min_side)
            for source, data in items
        ]
    except ImageError as exc:
        raise _refusal(exc) from None


def _b64(value: Any, source: str) -> bytes:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str) or not value:
        raise BadRequest("bad_request", f"{source}: expected a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("bad_request", f"{source}: not valid base64") from None


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes"))


def _check_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise BadRequest("bad_request", "the request holds no images")
    if n > limits.images:
        raise BadRequest("too_large", f"{n} images in one request; at most {limits.images}")


def _v1_instance(inst: Any, i: int) -> tuple[str, str, bytes]:
    """The id, source name and image bytes of one V1 instance."""
    source, value, ident = f"instances[{i}]", inst, i
    if isinstance(inst, dict):
        value = inst.get("image", inst)
        if isinstance(value, dict):
            value = value.get("b64")
        ident = inst.get("id", i)
    if value is None:
        raise BadRequest("bad_request", f'{source}: missing "image": {{"b64": "<base64 image>"}}')
    if len(str(ident)) > MAX_ID_CHARS:
        raise BadRequest("bad_request", f"{source}: the id is longer than {MAX_ID_CHARS} characters")
    return str(ident), source, _b64(value, source)


def parse_v1(payload: Any, limits: Limits) -> Batch:
    """``{"instances": [{"image": {"b64": ...}} | {"b64": ...} | "<base64>"], "parameters": {"return_map": true}}``."""
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list):
        raise BadRequest(
            "bad_request", 'V1 requests need "instances": [{"image": {"b64": "<base64 image>"}}, ...]'
        )
    _check_count(len(instances), limits)
    parsed = [_v1_instance(inst, i) for i, inst in enumerate(instances)]
    images = decode_all([(source, data) for _, source, data in parsed], limits)
    params = payload.get("parameters") or {}
    return_map = _truthy(params.get("return_map")) if isinstance(params, dict) else False
    return Batch(images, "v1", return_map, [ident for ident, _, _ in parsed])


def parse_v2(request: Any, limits: Limits) -> Batch:
    """An Open Inference Protocol request: one BYTES input of base64-encoded images (any input name)."""
    inputs = getattr(request, "inputs", None) or []
    if len(inputs) != 1:
        raise BadRequest(
            "bad_request", f"V2 requests need exactly one BYTES input of images, got {len(inputs)}"
        )
    tensor = inputs[0]
    name = short(tensor.name)
    if tensor.datatype != "BYTES":
        raise BadRequest("bad_request", f"input {name} has datatype {short(tensor.datatype)}; send BYTES")
    data = tensor.data if isinstance(tensor.data, list) else [tensor.data]
    _check_count(len(data), limits)
    items = [(f"{name}[{i}]", _b64(v, f"{name}[{i}]")) for i, v in enumerate(data)]
    params = getattr(request, "parameters", None) or {}
    return_map = _truthy(params.get("return_map")) if isinstance(params, dict) else False
    return Batch(decode_all(items, limits), "v2", return_map, [str(i) for i in range(len(items))])


def parse_body(body: bytes, content_type: str, limits: Limits) -> Batch:
    """A body KServe left undecoded: V1 JSON under a parameterised JSON type, or a raw image (no ``return_map``)."""
    base = content_type.split(";")[0].strip().lower()
    if base in JSON_TYPES:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRequest("bad_request", "the body is not valid UTF-8 JSON") from None
        return parse_v1(payload, limits)
    if base not in IMAGE_TYPES:
        raise BadRequest(
            "bad_request",
            f"content type {short(content_type)} is not accepted: send JSON (V1/V2) or an image "
            f"({', '.join(IMAGE_TYPES)})",
        )
    return Batch(decode_all([("request body", body)], limits), "raw", False, ["0"])
