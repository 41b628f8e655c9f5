"""Turn a KServe request (V1 JSON, V2 inference request, or a raw image body) into images, or refuse it clearly.

Every refusal is a :class:`BadRequest` with a ``kind`` (counted in ``tocoad_request_errors_total``) and a
message that says what was wrong and what the server accepts.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.images import ImageError, decode_image
from serving.settings import ServingSettings

# (application/octet-stream is not one: KServe parses it as JSON before the predictor sees it)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/gif", "image/webp")


class BadRequest(ValueError):
    """A request the predictor refuses (HTTP 4xx); ``kind`` is the error metric's label."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Batch:
    """Decoded images of one request plus its options."""

    images: list[np.ndarray]
    protocol: str  # v1 | v2 | raw
    return_map: bool = False
    ids: list[str] = field(default_factory=list)


def _decode(data: bytes, source: str, settings: ServingSettings) -> np.ndarray:
    try:
        return decode_image(
            data,
            source,
            max_pixels=settings.max_pixels,
            max_side=settings.max_side,
            min_side=settings.min_side,
        )
    except ImageError as exc:
        kind = "too_large" if "decompression bomb" in str(exc) or "above the limit" in str(exc) else "decode"
        raise BadRequest(kind, str(exc)) from None


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


def _check_count(n: int, settings: ServingSettings) -> None:
    if n == 0:
        raise BadRequest("bad_request", "the request holds no images")
    if n > settings.max_images_per_request:
        raise BadRequest("too_large", f"{n} images in one request; at most {settings.max_images_per_request}")


def parse_v1(payload: dict, settings: ServingSettings) -> Batch:
    """``{"instances": [{"image": {"b64": ...}} | {"b64": ...} | "<base64>"], "parameters": {"return_map": true}}``."""
    instances = payload.get("instances")
    if not isinstance(instances, list):
        raise BadRequest(
            "bad_request", 'V1 requests need "instances": [{"image": {"b64": "<base64 image>"}}, ...]'
        )
    _check_count(len(instances), settings)
    images, ids = [], []
    for i, inst in enumerate(instances):
        source = f"instances[{i}]"
        value = inst
        if isinstance(inst, dict):
            value = inst.get("image", inst)
            if isinstance(value, dict):
                value = value.get("b64")
            ids.append(str(inst.get("id", i)))
        else:
            ids.append(str(i))
        if value is None:
            raise BadRequest("bad_request", f'{source}: missing "image": {{"b64": "<base64 image>"}}')
        images.append(_decode(_b64(value, source), source, settings))
    params = payload.get("parameters") or {}
    return Batch(images, "v1", _truthy(params.get("return_map")) if isinstance(params, dict) else False, ids)


def parse_v2(request: Any, settings: ServingSettings) -> Batch:
    """An Open Inference Protocol request: one BYTES input of base64-encoded images (any input name)."""
    inputs = getattr(request, "inputs", None) or []
    if len(inputs) != 1:
        raise BadRequest(
            "bad_request", f"V2 requests need exactly one BYTES input of images, got {len(inputs)}"
        )
    tensor = inputs[0]
    if tensor.datatype != "BYTES":
        raise BadRequest("bad_request", f"input {tensor.name!r} has datatype {tensor.datatype}; send BYTES")
    data = tensor.data if isinstance(tensor.data, list) else [tensor.data]
    _check_count(len(data), settings)
    images = [
        _decode(_b64(v, f"{tensor.name}[{i}]"), f"{tensor.name}[{i}]", settings) for i, v in enumerate(data)
    ]
    params = getattr(request, "parameters", None) or {}
    return Batch(images, "v2", _truthy(params.get("return_map")), [str(i) for i in range(len(images))])


def parse_raw(body: bytes, content_type: str, settings: ServingSettings) -> Batch:
    """A raw image body (``Content-Type: image/png`` etc.); ``?return_map`` is not available here."""
    base = content_type.split(";")[0].strip().lower()
    if base not in IMAGE_TYPES:
        raise BadRequest(
            "bad_request",
            f"content type {content_type!r} is not accepted: send JSON (V1/V2) or an image ({', '.join(IMAGE_TYPES)})",
        )
    return Batch([_decode(body, "request body", settings)], "raw", False, ["0"])
