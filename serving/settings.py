"""The predictor's settings (typed, documented defaults), from ``TOCOAD_SERVE_<FIELD>`` environment variables."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field, ValidationError


class ServingSettings(BaseModel):
    """How the predictor takes requests, and how it watches defect rate and drift."""

    model_config = {"extra": "forbid"}

    max_body_bytes: int = Field(
        32 * 2**20, ge=1024, description="Largest request body; larger gets HTTP 413."
    )
    max_header_bytes: int = Field(
        64 * 2**10,
        ge=1024,
        description="Largest request head (request line and headers); larger gets 431/400.",
    )
    max_images_per_request: int = Field(32, ge=1, description="Most images in one request (one batch).")
    max_pixels: int = Field(
        40_000_000, ge=64, description="Hard ceiling on one image (width x height), whatever the model."
    )
    pixel_factor: float = Field(
        16.0,
        gt=0,
        description="Largest image, in multiples of the model's input (image_size^2; 16 = 4x per side); "
        "checked from the header, before decoding.",
    )
    request_pixel_factor: float = Field(
        128.0, gt=0, description="Most pixels in all images of one request, in the same multiples."
    )
    max_concurrent_decodes: int = Field(
        2, ge=1, description="Requests decoding and scoring at once (in worker threads); others wait."
    )
    max_side: int = Field(16384, ge=8, description="Largest image side in px.")
    min_side: int = Field(8, ge=1, description="Smallest image side in px.")
    map_size: int = Field(64, ge=8, le=1024, description="Side of the anomaly map returned when asked for.")
    defect_window: int = Field(200, ge=1, description="Images in the rolling defect-rate window.")
    drift_window: int = Field(
        500, ge=10, description="Images in the sliding window the drift gauges compare."
    )
    drift_min_images: int = Field(
        50, ge=1, description="Drift gauges are exported once the window has this many."
    )
    drift_bins: int = Field(
        10, ge=2, le=20, description="Quantile bins of the training profile used for PSI."
    )
    control_token_file: str = Field(
        "",
        description="File holding the token that reload, load and unload require (Authorization: Bearer), "
        "e.g. a mounted Kubernetes Secret; re-read on each call. Empty: those endpoints are off.",
    )
    reload_poll_s: float = Field(
        0.0,
        ge=0.0,
        description="Poll the registry's production alias this often (s) and reload on change; 0: off.",
    )

    @classmethod
    def from_env(cls) -> ServingSettings:
        """Defaults overridden by ``TOCOAD_SERVE_<FIELD>`` variables; a bad value raises ValueError naming it."""
        values = {}
        for name in cls.model_fields:
            raw = os.environ.get(f"TOCOAD_SERVE_{name.upper()}")
            if raw is not None:
                values[name] = raw
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = first["loc"][0] if first["loc"] else "?"
            raise ValueError(f"TOCOAD_SERVE_{str(field).upper()}: {first['msg']}") from None
