"""One interface to run a training stage as a job: a local subprocess, or a Kubernetes Job on a GPU node.

A stage job is the ``tocoad`` command line with S3 URIs for its inputs and outputs (``StageSpec.argv``), so it
is stateless and can run anywhere that reaches the S3 store. The flow picks a backend with :func:`make_runner`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# exit codes of the tocoad CLI that mean "try again later": storage unreachable (3)
TRANSIENT_EXIT_CODES = frozenset({3})


@dataclass(frozen=True)
class StageSpec:
    """A stage job: ``tocoad <argv...>``, its name, cache key and resources."""

    stage: str  # d | c | bank | evaluate
    argv: tuple[str, ...]  # arguments after ``tocoad``
    key: str  # cache key (inputs' hash); also names the job
    model_name: str
    gpus: int = 1
    cpu: str = "4"
    memory: str = "16Gi"
    deadline_s: int = 6 * 3600
    backoff_limit: int = 1
    env: dict[str, str] = field(default_factory=dict)  # extra, non-secret environment

    @property
    def job_name(self) -> str:
        """A DNS-1123 name for the job: ``tocoad-<model>-<stage>-<key[:10]>``."""
        base = (
            f"tocoad-{self.model_name}-{self.stage}".lower()
            .replace("_", "-")
            .replace(".", "-")[:48]
            .rstrip("-")
        )
        return f"{base}-{self.key[:10]}"


class StageFailed(RuntimeError):
    """A stage job failed; ``logs`` holds its last lines, ``transient`` says whether a retry may help."""

    def __init__(self, message: str, logs: str = "", transient: bool = False):
        super().__init__(message + (f"\n--- last log lines ---\n{logs}" if logs else ""))
        self.logs, self.transient = logs, transient


class StageRunner(Protocol):
    """Runs a stage job to completion, streaming its log lines to ``log``; raises :class:`StageFailed`."""

    def run(self, spec: StageSpec, log: Callable[[str], None]) -> None: ...


class LocalRunner:
    """Each stage as a subprocess on this machine (the embedded default; what the tests use)."""

    def __init__(self, python: str | None = None, tail_lines: int = 40):
        self.python = python or sys.executable
        self.tail_lines = tail_lines

    def run(self, spec: StageSpec, log: Callable[[str], None]) -> None:
        cmd = [self.python, "-m", "tocoad.cli", *spec.argv]
        env = {**os.environ, **spec.env, "TOCOAD_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
        tail: deque[str] = deque(maxlen=self.tail_lines)
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        timer = threading.Timer(spec.deadline_s, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                log(line)
            code = proc.wait()
        finally:
            timer.cancel()
        if code != 0:
            late = time.monotonic() - start >= spec.deadline_s
            why = f"passed its deadline of {spec.deadline_s} s" if late else f"exited with status {code}"
            raise StageFailed(
                f"stage {spec.stage} ({spec.job_name}) {why}", "\n".join(tail), code in TRANSIENT_EXIT_CODES
            )


def make_runner(kind: str) -> StageRunner:
    """``local`` or ``kubernetes``."""
    if kind == "local":
        return LocalRunner()
    if kind == "kubernetes":
        from flows.k8s_jobs import KubernetesRunner

        return KubernetesRunner.from_environment()
    raise ValueError(f"runner {kind!r}: choose local or kubernetes")
