"""Start the KServe ModelServer with the tocoad predictor, plus a reload endpoint, a body-size limit and an
optional registry poll. ``tocoad serve`` calls :func:`serve`; KServe's own flags are not used.

Routes beyond KServe's (V1 ``/v1/models/<name>:predict``, V2 ``/v2/models/<name>/infer``, health, metadata and
``/metrics``): ``POST /v2/models/<name>/reload`` with optional ``{"storage_uri": "s3://models/<name>/<version>"}``.
"""

import asyncio
import logging
import sys
import threading
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

log = logging.getLogger("tocoad.serving")


def build_app(predictor: Any) -> Any:
    """Add tocoad's routes and middleware to KServe's FastAPI app; return the app."""
    from kserve import model_server

    from serving.predictor import ERROR_KIND, ReloadFailed

    app = model_server.app
    limit = predictor.settings.max_body_bytes

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            predictor.metrics.errors.labels(predictor.name, "too_large").inc()
            return JSONResponse(
                {"error": f"request body of {length} bytes is above the {limit}-byte limit"}, 413
            )
        holder: dict = {}
        ERROR_KIND.set(holder)
        response = await call_next(request)
        status = response.status_code
        if status >= 400 and "/models/" in request.url.path and not request.url.path.endswith("/reload"):
            default = {404: "unknown_model", 413: "too_large", 503: "not_ready"}.get(status)
            kind = holder.get("kind") or default or ("internal" if status >= 500 else "bad_request")
            predictor.metrics.errors.labels(predictor.name, kind).inc()
        return response

    @app.post("/v2/models/{model_name}/reload")
    async def reload(model_name: str, request: Request):
        if model_name != predictor.name:
            return JSONResponse(
                {"error": f"model {model_name} is not served here (it serves {predictor.name})"}, 404
            )
        body = await request.body()
        uri = None
        if body:
            try:
                uri = (await request.json()).get("storage_uri")
            except Exception:  # noqa: BLE001
                return JSONResponse({"error": 'body must be JSON like {"storage_uri": "s3://..."}'}, 400)
        try:
            loaded = await asyncio.to_thread(predictor.reload, uri)
        except ReloadFailed as exc:
            current = predictor.current.version if predictor.current else None
            return JSONResponse({"error": str(exc), "serving": current}, 409)
        return {"model": predictor.name, "version": loaded.version, "uri": loaded.uri}

    return app


def poll_registry(predictor: Any, every_s: float, stop: threading.Event) -> None:
    """Reload when the alias behind ``storage_uri`` (e.g. ``s3://models/bottle/production``) moves."""
    from storage.registry import ModelRegistry, parse_s3_uri
    from storage.store import ArtifactStore

    while not stop.wait(every_s):
        uri = predictor.storage_uri
        if not uri.startswith("s3://"):
            continue
        try:
            _, prefix = parse_s3_uri(uri)
            name, ref = prefix.split("/", 1)
            version = ModelRegistry(ArtifactStore(progress=False)).resolve(name, ref)
            if predictor.current is None or version != predictor.current.version:
                predictor.reload(uri)
        except Exception as exc:  # noqa: BLE001 - a poll failure is logged; the model keeps serving
            log.warning("registry poll failed: %s", exc)


def serve(storage_uri: str, name: str = "tocoad", host: str = "127.0.0.1", port: int = 8080,
          settings: Any = None) -> None:  # fmt: skip
    """Load the model (ready only when loaded and warmed up) and serve it until SIGTERM/SIGINT."""
    sys.argv = sys.argv[:1]  # KServe parses the process arguments when imported
    from kserve import ModelServer
    from kserve.protocol.rest.server import RESTServer

    from serving.predictor import TocoadPredictor
    from serving.settings import ServingSettings

    tocoad_log = logging.getLogger("tocoad")
    if not tocoad_log.handlers:  # KServe configures its own loggers only; ours go to stderr beside them
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        tocoad_log.addHandler(handler)
        tocoad_log.setLevel(logging.INFO)
    settings = settings or ServingSettings.from_env()
    predictor = TocoadPredictor(name, storage_uri, settings)
    started = time.perf_counter()
    predictor.load()
    log.info("model %s %s ready in %.1f s", name, predictor.current.version, time.perf_counter() - started)
    build_app(predictor)
    stop = threading.Event()
    if settings.reload_poll_s > 0:
        threading.Thread(
            target=poll_registry, args=(predictor, settings.reload_poll_s, stop), daemon=True
        ).start()

    class Server(ModelServer):
        """KServe's ModelServer, bound to ``host`` (KServe itself always binds 0.0.0.0)."""

        def start(self, models: list) -> None:
            from kserve.model_server import FASTAPI_APP_IMPORT_STRING

            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = RESTServer(
                FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
                grace_period=self.grace_period, timeout_keep_alive=self.timeout_keep_alive,
            )  # fmt: skip
            self._rest_server.config.host = host
            self.servers.append(self._rest_server.start())
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

    try:
        Server(http_port=port, enable_grpc=False, workers=1).start([predictor])
    finally:
        stop.set()
