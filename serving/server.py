"""Start the KServe ModelServer with the tocoad predictor, its guard (size limits, version routes, error counts),
the control endpoints and an optional registry poll. ``tocoad serve`` calls :func:`serve`; KServe's own flags
are not used.

Routes beyond KServe's (V1 ``/v1/models/<name>:predict``, V2 ``/v2/models/<name>/infer``, health, metadata and
``/metrics``), each needing the control token (:mod:`serving.control`):

* ``POST /v2/models/<name>/reload`` with optional ``{"storage_uri": "s3://models/<name>/<version>"}`` or
  ``{"version": "<version|alias>"}``; a server that follows an alias loads a version only with ``"pin": true``;
* ``POST /v2/repository/models/<name>/unload`` (not ready, model dropped) and ``.../load`` (loaded again).

``GET /v2/models/<name>`` (no token) adds ``versions`` (the loaded one) and ``parameters``: ``following`` (an
alias) or ``pinned`` (a version), and ``storage_uri``. ``/v2/health/ready`` is true only while a model is loaded;
``/v2/health/live`` always answers, since decoding and scoring run in worker threads.
"""

import asyncio
import logging
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from serving.control import ControlRefused

log = logging.getLogger("tocoad.serving")


async def _json_body(request: Request) -> Any:
    """The request's JSON (None when empty); 400 when it is not JSON."""
    if not await request.body():
        return None
    try:
        return await request.json()
    except ValueError:
        raise ControlRefused(400, 'the body must be JSON like {"storage_uri": "s3://..."}') from None


def build_app(predictor: Any) -> Any:
    """Add tocoad's routes and guard to KServe's FastAPI app; return the app."""
    from kserve import model_server

    from serving.control import check_token, reload_target
    from serving.errors import error_response, refuse
    from serving.guard import Guard
    from serving.predictor import ReloadFailed

    app = model_server.app
    app.add_middleware(Guard, predictor=predictor)

    async def control(request: Request, model_name: str, action: Callable[[], Awaitable[dict]]) -> Any:
        """Run ``action`` for a caller with the token, on this server's model; refuse anything else."""
        try:
            check_token(predictor.settings.control_token_file, request.headers.get("authorization"))
            if model_name != predictor.name:
                raise ControlRefused(
                    404, f"model {model_name[:40]} is not served here (it serves {predictor.name})"
                )
            return await action()
        except ControlRefused as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return refuse(request.method, request.url.path, exc.status, str(exc), headers)
        except ReloadFailed as exc:
            current = predictor.current.version if predictor.current else None
            return JSONResponse({"error": str(exc)[:500], "serving": current}, 409)

    @app.get("/v2/health/ready")
    async def ready() -> Any:
        if await predictor.healthy():
            return {"ready": True}
        return error_response(503, "no model is loaded")

    @app.get("/v2/models/{model_name}")
    async def metadata(model_name: str) -> Any:
        if model_name != predictor.name:
            return error_response(
                404, f"model {model_name[:40]} is not served here (it serves {predictor.name})"
            )
        loaded = predictor.current
        return {"name": predictor.name, "versions": [loaded.version] if loaded else [], "platform": "",
                "inputs": predictor.get_input_types(), "outputs": predictor.get_output_types(),
                "parameters": predictor.parameters()}  # fmt: skip

    @app.post("/v2/models/{model_name}/reload")
    async def reload(model_name: str, request: Request) -> Any:
        async def action() -> dict:
            uri = reload_target(predictor.origin, await _json_body(request), predictor.storage_uri)
            loaded = await asyncio.to_thread(predictor.reload, uri)
            return {
                "model": predictor.name,
                "version": loaded.version,
                "uri": loaded.uri,
                **predictor.parameters(),
            }

        return await control(request, model_name, action)

    @app.post("/v2/repository/models/{model_name}/load")
    async def load(model_name: str, request: Request) -> Any:
        async def action() -> dict:
            await asyncio.to_thread(predictor.load)
            return {"name": predictor.name, "load": True, "version": predictor.current.version}

        return await control(request, model_name, action)

    @app.post("/v2/repository/models/{model_name}/unload")
    async def unload(model_name: str, request: Request) -> Any:
        async def action() -> dict:
            await asyncio.to_thread(predictor.unload)
            return {"name": predictor.name, "unload": True}

        return await control(request, model_name, action)

    return app


def poll_registry(predictor: Any, every_s: float, stop: threading.Event) -> None:
    """Reload when the alias behind ``storage_uri`` (e.g. ``s3://models/bottle/production``) moves."""
    from serving.loading import open_registry
    from storage.registry import parse_s3_uri

    while not stop.wait(every_s):
        uri = predictor.storage_uri
        if not uri.startswith("s3://") or predictor.current is None:
            continue
        try:
            _, prefix = parse_s3_uri(uri)
            name, ref = prefix.split("/", 1)
            version = open_registry().resolve(name, ref)
            if version != predictor.current.version:
                predictor.reload(uri)
        except Exception as exc:  # noqa: BLE001 - a poll failure is logged; the model keeps serving
            log.warning("registry poll failed: %s", exc)


def _rest_server(host: str, port: int, settings: Any, server: Any) -> Any:
    """KServe's REST server bound to ``host``, with h11 (which bounds the request head it buffers) and tocoad's
    error handlers installed after KServe's."""
    from kserve.model_server import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    from serving.errors import add_error_handlers

    class Rest(RESTServer):
        def _add_exception_handlers(self, app: Any) -> None:
            super()._add_exception_handlers(app)
            add_error_handlers(app)

    rest = Rest(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, port,
                grace_period=server.grace_period, timeout_keep_alive=server.timeout_keep_alive)  # fmt: skip
    rest.config.host = host
    rest.config.http = "h11"
    rest.config.h11_max_incomplete_event_size = settings.max_header_bytes
    return rest


def serve(storage_uri: str, name: str = "tocoad", host: str = "127.0.0.1", port: int = 8080,
          settings: Any = None) -> None:  # fmt: skip
    """Load the model (ready only when loaded and warmed up) and serve it until SIGTERM/SIGINT."""
    sys.argv = sys.argv[:1]  # KServe parses the process arguments when imported
    from kserve import ModelServer

    # KServe (0.21) answers with FastAPI's ORJSONResponse, which FastAPI deprecates: each of KServe's endpoints
    # logged a FastAPIDeprecationWarning on its first request. Not ours to fix; silence exactly that one.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated", module=r"fastapi\.")

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
        """KServe's ModelServer with tocoad's REST server (KServe itself always binds 0.0.0.0)."""

        def start(self, models: list) -> None:
            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = _rest_server(host, port, settings, self)
            self.servers.append(self._rest_server.start())
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

    try:
        Server(http_port=port, enable_grpc=False, workers=1).start([predictor])
    finally:
        stop.set()
