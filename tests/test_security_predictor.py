"""Issue 12, predictor holes 6-11, kept closed: each test talks HTTP to a real ``tocoad serve`` on loopback.

One server (``secured``) has a control token and small limits: a 4 MiB body, a 16 KiB head, and pixel limits
raised so that an 8 Mpx request is allowed (decoding it takes a visible fraction of a second) while a 12 Mpx one
is refused. ``live_predictor`` (conftest) runs with the defaults and no token. The property-based tests at the end
fuzz image decoding in process and the V1/V2/raw request parsers over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Predictor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile
from prometheus_client.parser import text_string_to_metric_families

from components.images import ImageError, decode_image

V1 = "/v1/models/tocoad:predict"
V2 = "/v2/models/tocoad/infer"
MAX_BODY = 4 * 2**20
MAX_HEAD = 16 * 2**10
S3_ENV = ("TOCOAD_S3_ENDPOINT", "S3_ENDPOINT", "AWS_ENDPOINT_URL", "TOCOAD_S3_ACCESS_KEY", "TOCOAD_S3_SECRET_KEY",
          "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # fmt: skip


class Secured:
    """The secured server: its URL, control token file and log."""

    def __init__(self, server: Predictor, token_file: str):
        self.server, self.url, self.token_file = server, server.url, token_file
        self.token = Path(token_file).read_text().strip()

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def log_text(self) -> str:
        self.server.log.flush()
        return Path(self.server.log.name).read_text(errors="replace")


@pytest.fixture(scope="module")
def secured(serve_bundles, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secured")
    token_file = folder / "control-token"  # as a mounted Kubernetes Secret holds it
    token_file.write_text(secrets.token_urlsafe(24) + "\n")
    env = {"TOCOAD_SERVE_CONTROL_TOKEN_FILE": str(token_file), "TOCOAD_SERVE_MAX_BODY_BYTES": str(MAX_BODY),
           "TOCOAD_SERVE_MAX_HEADER_BYTES": str(MAX_HEAD), "TOCOAD_SERVE_PIXEL_FACTOR": "1000",
           "TOCOAD_SERVE_REQUEST_PIXEL_FACTOR": "2000"}  # fmt: skip
    server = Predictor(
        serve_bundles[0], env=env, log_dir=folder
    )  # 64 px model: 4.1 Mpx per image, 8.2 per request
    try:
        yield Secured(server, str(token_file))
    finally:
        server.stop()


# ---------------------------------------------------------------- helpers
def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _raw_png(width: int, height: int, depth: int, colour: int, rows: int | None = None) -> bytes:
    """A PNG of zero pixels whose header says ``width x height``; only ``rows`` rows of data when given."""
    channels = {0: 1, 2: 3, 6: 4}[colour]
    row = b"\x00" + bytes(-(-width * channels * depth // 8))
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height if rows is None else rows)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _rgba16(side: int) -> bytes:
    """A small file that is costly to decode: 16-bit RGBA, ``side`` px square (31 KB at 2000 px)."""
    return _raw_png(side, side, 16, 6)


def _v1(*images: bytes) -> dict:
    return {"instances": [{"image": {"b64": _b64(b)}} for b in images]}


def _good_png() -> bytes:
    return _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _errors(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.labels["kind"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "tocoad_request_errors_total"}  # fmt: skip


def _exchange(url: str, head: bytes, body=(), wait_s: float = 60) -> tuple[bytes, int]:
    """Send a raw request (head, then body chunks from a thread) and read the answer until the server closes.

    Returns the answer's first bytes and how many body bytes were sent before the server stopped reading."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sent = [0]

    def write() -> None:
        try:
            sock.sendall(head)
            for part in body:
                sock.sendall(part)
                sent[0] += len(part)
        except OSError:
            pass  # the server closed the connection: what the test wants

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    sock.settimeout(wait_s)
    answer = b""
    try:
        while data := sock.recv(65536):
            answer += data
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        sock.close()
    writer.join(5)
    return answer[:500], sent[0]


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


# ---------------------------------------------------------------- hole 6
def _starts_storage(home, monkeypatch) -> tuple[int, str, bool]:
    """``tocoad serve --model`` and a load by URI with no S3 endpoint and no local server running: the exit code,
    the load's error, and whether a local S3 server got started (stopped again here)."""
    from serving.loading import load_model
    from storage.local_server import LocalS3
    from tocoad.cli import main

    for name in S3_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOCOAD_HOME", str(home))
    monkeypatch.setenv("TOCOAD_S3_ROLE", "predictor")  # what `tocoad serve` sets; restored afterwards
    local = LocalS3(home / "s3")
    try:
        code = main(["serve", "--model", "absent", "--port", "0"])
        try:
            load_model("s3://models/absent/production", "absent")  # what a reload by URI runs
            error = ""
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            error = str(exc)
        return code, error, local.status() is not None
    finally:
        if local.status() is not None:
            local.down()


def _predict_status(url: str) -> int:
    return httpx.post(
        url + V1, content=_good_png(), headers={"Content-Type": "image/png"}, timeout=60
    ).status_code


def test_hole6_control_endpoints_need_a_token_name_only_the_served_model_and_readiness_follows(
    secured, live_predictor, serve_bundles, tmp_path, monkeypatch
):
    for path in ("/v2/models/tocoad/reload", "/v2/repository/models/tocoad/unload",
                 "/v2/repository/models/tocoad/load"):  # fmt: skip
        r = httpx.post(live_predictor + path, timeout=30)  # no token configured there: off
        assert r.status_code == 403 and "off" in r.json()["error"], (path, r.text)
    assert httpx.get(f"{live_predictor}/v2/health/ready", timeout=10).status_code == 200

    url = secured.url
    for headers in ({}, secured.auth("x" * 32), {"Authorization": secured.token}):
        r = httpx.post(f"{url}/v2/repository/models/tocoad/unload", headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    assert _predict_status(url) == 200
    for body in ({"storage_uri": str(serve_bundles[1])}, {"storage_uri": "s3://models/other/production"},
                 {"version": "production"}, {"storage_uri": "http://example.com/x"}):  # fmt: skip
        r = httpx.post(f"{url}/v2/models/tocoad/reload", json=body, headers=secured.auth(), timeout=30)
        assert r.status_code == 403 and "error" in r.json(), (body, r.text)
    assert (
        httpx.post(f"{url}/v2/models/tocoad/reload", headers=secured.auth(), timeout=120).status_code == 200
    )

    try:
        r = httpx.post(f"{url}/v2/repository/models/tocoad/unload", headers=secured.auth(), timeout=30)
        assert r.status_code == 200, r.text
        for path in ("/v2/health/ready", "/v2/models/tocoad/ready"):
            assert httpx.get(url + path, timeout=10).status_code == 503, path
        assert _predict_status(url) == 503
    finally:
        r = httpx.post(f"{url}/v2/repository/models/tocoad/load", headers=secured.auth(), timeout=120)
    assert r.status_code == 200 and httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    assert _predict_status(url) == 200

    code, error, started = _starts_storage(tmp_path / "home", monkeypatch)
    assert not started and code != 0 and "not running" in error, (code, error)

    from serving.control import ControlRefused, reload_target

    origin = "s3://models/bottle/production"
    assert reload_target(origin, None) is None and reload_target(origin, {}) is None
    assert reload_target(origin, {"version": "candidate"}) == "s3://models/bottle/candidate"
    version = "s3://models/bottle/20261130T172747.123Z-96aa2e5e"
    assert reload_target(origin, {"storage_uri": version}) == version
    for body in ({"storage_uri": "s3://models/bottle/../other/v1"}, {"storage_uri": "s3://models/bottle/_aliases"},
                 {"storage_uri": "s3://datasets/bottle/v1"}, {"version": "a/b"}, {"storage_uri": 3},
                 {"storage_uri": origin, "extra": 1}, ["x"]):  # fmt: skip
        with pytest.raises(ControlRefused):
            reload_target(origin, body)


# ---------------------------------------------------------------- hole 7
def test_hole7_body_is_counted_while_it_streams_and_the_head_is_limited(secured):
    url = secured.url
    head = b"POST /v1/models/tocoad:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    part = b"10000\r\n" + b" " * 0x10000 + b"\r\n"  # 64 KiB chunks of a 300 MB body
    answer, sent = _exchange(url, head + b"Transfer-Encoding: chunked\r\n\r\n", (part for _ in range(4800)))
    assert _status(answer) == 413 and b"limit" in answer, answer
    assert sent < 64 * 2**20, f"the server read {sent} bytes past a {MAX_BODY}-byte limit"

    answer, sent = _exchange(url, head + b"Content-Length: 300000000\r\n\r\n", (part for _ in range(4800)))
    assert _status(answer) == 413 and sent < 64 * 2**20, answer

    for pad in (MAX_HEAD + 4096, 20 * 2**20):  # above our limit; far above what the parser buffers
        answer, _ = _exchange(
            url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * pad + b"\r\n\r\n"
        )
        assert _status(answer) in (400, 431), (pad, answer)

    chunked = httpx.post(url + V1, content=iter([b'{"instances": [{"image": {"b64": "', _b64(_good_png()).encode(),
                                                 b'"}}]}']), headers={"Content-Type": "application/json"},
                         timeout=60)  # fmt: skip
    assert chunked.status_code == 200, chunked.text  # a chunked body under the limit is served
    assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200


# ---------------------------------------------------------------- hole 8
def _liveness_while(url: str, request) -> tuple[float, float]:
    """Run ``request`` while polling liveness; return (request seconds, slowest liveness answer in seconds)."""
    done, slowest = threading.Event(), [0.0]

    def poll() -> None:
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                start = time.perf_counter()
                assert client.get(f"{url}/v2/health/live").status_code == 200
                slowest[0] = max(slowest[0], time.perf_counter() - start)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.2)
    start = time.perf_counter()
    try:
        request()
    finally:
        took = time.perf_counter() - start
        done.set()
        poller.join()
    return took, slowest[0]


def test_hole8_pixel_limits_per_image_and_request_and_liveness_while_decoding(secured, live_predictor):
    big = _png(np.zeros((1024, 1024, 3), np.uint8))  # 1 Mpx: 16x what the 64 px model needs per side squared
    r = httpx.post(live_predictor + V1, content=big, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 400 and "above the limit" in r.json()["error"], r.text
    ok = _png(np.zeros((256, 256, 3), np.uint8))
    assert httpx.post(live_predictor + V1, json=_v1(ok), timeout=60).status_code == 200

    heavy = _rgba16(2000)  # 31 KB; 4 Mpx each
    start = time.perf_counter()
    r = httpx.post(secured.url + V1, json=_v1(heavy, heavy, heavy), timeout=120)
    assert r.status_code == 400 and "per-request budget" in r.json()["error"], r.text
    assert time.perf_counter() - start < 10  # refused from the headers, nothing decoded

    for _ in range(2):

        def score() -> None:
            answer = httpx.post(secured.url + V1, json=_v1(heavy, heavy), timeout=120)
            assert answer.status_code == 200, answer.text

        took, slowest = _liveness_while(secured.url, score)
        assert slowest < 0.5 * took, f"liveness took {slowest:.2f} s during a {took:.2f} s request"


# ---------------------------------------------------------------- hole 9
def test_hole9_truncated_images_are_refused(secured, monkeypatch):
    import serving.server  # noqa: F401 - the serving stack must leave Pillow's flag alone

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    bomb = _raw_png(16000, 2500, 8, 0, rows=8)  # the trial's file: a few hundred bytes
    with pytest.raises(ImageError, match="truncated"):
        decode_image(bomb, max_pixels=40_000_000)
    short = _raw_png(1500, 1500, 8, 0, rows=700)  # within every limit; 800 rows missing
    for body in (bomb, short):
        r = httpx.post(secured.url + V1, content=body, headers={"Content-Type": "image/png"}, timeout=60)
        assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
    assert "truncated" in r.json()["error"]
    assert decode_image(_raw_png(1500, 1500, 8, 0)).shape == (1500, 1500, 3)

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(_good_png())


# ---------------------------------------------------------------- hole 10
def test_hole10_protocol_details(secured):
    url, png = secured.url, _good_png()
    before = _errors(url)
    r = httpx.post(url + V1, content=json.dumps(_v1(png)), headers={"Content-Type": "application/json; charset=utf-8"},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    version = r.json()["model_version"]

    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(png)]}]}
    r = httpx.post(f"{url}/v2/models/tocoad/versions/{version}/infer", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["model_version"] == version, r.text
    assert httpx.get(f"{url}/v2/models/tocoad/versions/{version}/ready", timeout=10).status_code == 200
    for path in (f"/v2/models/tocoad/versions/{'9' * 5000}/infer", "/v2/models/other/versions/1/infer"):
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 404 and len(r.content) < 1000 and "error" in r.json(), r.text
    r = httpx.post(f"{url}/v1/models/tocoad:explain", json=_v1(png), timeout=60)
    assert r.status_code == 501 and "error" in r.json(), r.text

    junk = "Q" * 2_000_000
    for bad in ({"inputs": junk}, {"inputs": [{"name": junk, "datatype": "FP16", "shape": [1], "data": [1]}]},
                {"inputs": [{"name": junk, "datatype": "INT8", "shape": [1], "data": [1]}]},
                {"inputs": [{"name": "image", "shape": [1], "data": [junk]}]}):  # fmt: skip
        r = httpx.post(url + V2, json=bad, timeout=60)
        assert 400 <= r.status_code < 500 and set(r.json()) == {"error"}, r.text[:300]
        assert len(r.content) < 1000 and r.text.count("Q") < 100  # a name is recognisable, never echoed whole
    after = _errors(url)
    assert after.get("internal", 0) == before.get("internal", 0), (before, after)
    assert after.get("unknown_model", 0) - before.get("unknown_model", 0) == 2
    assert "Traceback" not in secured.log_text()


# ---------------------------------------------------------------- property-based: decoding and parsers
def _seeds() -> list[bytes]:
    """Small valid files of every accepted format, to mutate."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
    out = []
    for fmt, mode in (("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "I;16"), ("JPEG", "RGB"), ("GIF", "P"),
                      ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB")):  # fmt: skip
        image = (
            Image.fromarray(rgb[..., 0].astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(rgb)
        )
        buf = io.BytesIO()
        (image if mode in ("RGB", "I;16") else image.convert(mode)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()
FUZZ = settings(max_examples=120, deadline=3000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


@st.composite
def image_bytes(draw) -> bytes:
    """Random bytes, or a valid file cut, with bytes overwritten, or with a header field enlarged."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it is fed
@FUZZ
@given(image_bytes())
def test_property_image_decoding_returns_rgb_or_refuses_cleanly(data):
    try:
        image = decode_image(data, max_pixels=4_000_000, max_side=4096)
    except ImageError:
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 8


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=20), image_bytes().map(_b64))  # fmt: skip
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=12)  # fmt: skip
V1_BODY = st.fixed_dictionaries(
    {
        "instances": st.one_of(
            JSON,
            st.lists(st.one_of(JSON, image_bytes().map(lambda b: {"image": {"b64": _b64(b)}})), max_size=4),
        )
    },  # fmt: skip
    optional={"parameters": JSON},
)
V2_INPUT = st.fixed_dictionaries(
    {
        "name": st.text(max_size=10),
        "datatype": st.sampled_from(["BYTES", "FP32", "FP16", "INT64", "BOOL", "x"]),
        "shape": st.lists(st.integers(-2, 5), max_size=3),
        "data": st.lists(JSON, max_size=4),
    },  # fmt: skip
    optional={"parameters": JSON},
)
V2_BODY = st.fixed_dictionaries({"inputs": st.one_of(JSON, st.lists(V2_INPUT, max_size=3))},
                                optional={"id": JSON, "parameters": JSON, "outputs": JSON})  # fmt: skip
RAW = st.tuples(st.sampled_from(["image/png", "image/jpeg", "image/gif", "application/json", "application/json; charset=utf-8",
                                 "text/plain", "image/png; q=1"]), image_bytes())  # fmt: skip
REQUESTS = st.one_of(V1_BODY.map(lambda b: ("json", V1, b)), V2_BODY.map(lambda b: ("json", V2, b)),
                     JSON.map(lambda b: ("json", V2, b)), RAW.map(lambda r: ("raw", V1, r)))  # fmt: skip


@pytest.fixture(scope="module")
def client(secured):
    with httpx.Client(base_url=secured.url, timeout=30) as http:
        yield http


@settings(FUZZ, max_examples=150, deadline=10_000)
@given(REQUESTS)
def test_property_v1_v2_and_raw_parsers_answer_200_or_a_clean_4xx(client, request_):
    kind, path, body = request_
    if kind == "json":
        r = client.post(path, json=body)
    else:
        r = client.post(path, content=body[1], headers={"Content-Type": body[0]})
    assert r.status_code == 200 or (400 <= r.status_code < 500 and set(r.json()) == {"error"}), (
        r.status_code,
        r.text[:300],
    )


# ---------------------------------------------------------------- hole 11
def test_hole11_the_server_keeps_following_the_alias_through_deploy_and_rollback(
    s3_server, serve_bundles, serve_data, tmp_path, monkeypatch
):
    """A predictor started on ``production`` follows it: the flow's deploy reloads the alias, a version is loaded
    only when pinned explicitly, and a rollback in the registry takes effect within the poll interval."""
    from flows.deploy import deploy_version
    from storage.registry import ModelRegistry
    from storage.store import ArtifactStore

    registry = ModelRegistry(ArtifactStore(progress=False))
    first = registry.register("followed", serve_bundles[0], alias="production").version
    second = registry.register("followed", serve_bundles[1]).version
    token = tmp_path / "control-token"
    token.write_text(secrets.token_urlsafe(24))
    env = {"TOCOAD_SERVE_CONTROL_TOKEN_FILE": str(token), "TOCOAD_SERVE_RELOAD_POLL_S": "0.5"}
    server = Predictor("s3://models/followed/production", env=env, log_dir=tmp_path)
    auth = {"Authorization": f"Bearer {token.read_text()}"}

    def served() -> tuple[str, dict, set]:
        """The version a prediction names, the metadata's parameters, and the model-info (version, follows)."""
        version = httpx.post(server.url + V1, json=_v1(_good_png()), timeout=60).json()["predictions"][0]
        meta = httpx.get(f"{server.url}/v2/models/tocoad", timeout=10).json()
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        info = {(s.labels["version"], s.labels.get("follows")) for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "tocoad_model_info" and s.value == 1}  # fmt: skip
        return version["model_version"], meta.get("parameters", {}), info

    def wait_for(version: str) -> tuple[str, dict, set]:
        deadline = time.monotonic() + 30
        while (state := served())[0] != version and time.monotonic() < deadline:
            time.sleep(0.2)
        return state

    try:
        assert served() == (first, {"following": "production", "storage_uri": "s3://models/followed/production"},
                            {(first, "production")})  # fmt: skip
        registry.promote("followed", second)
        monkeypatch.setenv("TOCOAD_SERVE_CONTROL_TOKEN_FILE", str(token))
        monkeypatch.setenv("TOCOAD_PREDICTOR_URL", server.url)
        said = deploy_version("followed", registry.uri("followed", second), cluster=False)
        assert "production alias" in said and second in said, said
        version, params, info = served()
        assert (version, params["following"], info) == (second, "production", {(second, "production")})

        reload = f"{server.url}/v2/models/tocoad/reload"
        r = httpx.post(reload, json={"version": first}, headers=auth, timeout=120)
        assert r.status_code == 409 and '"pin": true' in r.json()["error"], r.text
        assert served()[0] == second

        registry.rollback("followed")  # production: back to the first version
        version, params, info = wait_for(first)
        assert (version, params["following"], info) == (first, "production", {(first, "production")})

        r = httpx.post(reload, json={"version": second, "pin": True}, headers=auth, timeout=120)
        assert r.status_code == 200 and r.json()["pinned"] == second, r.text
        version, params, info = served()
        assert (version, params.get("pinned"), params.get("following"), info) == (second, second, None,
                                                                                  {(second, "")})  # fmt: skip
        r = httpx.post(reload, json={"version": "production"}, headers=auth, timeout=120)
        assert r.status_code == 200 and served()[1]["following"] == "production", r.text
    finally:
        server.stop()
