"""A real ``mlflow server`` for tests (DESIGN.md §8: start the real thing, never a mock).

    from tests.mlflow_server import start_mlflow_server, mlflow_server_fixture

    with start_mlflow_server(tmp_path) as server:      # blocks until /health answers
        cfg = TrackingConfig(uri=server.uri, experiment="x")
        server.stop()                                   # simulate an outage
        server.restart()                                # same port, same store

    mlflow_server = mlflow_server_fixture(scope="module")   # in a test module

Start-up costs 9-25 s on 2 shared cores (docs/mlflow.md), so share a server per module
where the tests allow it and mark users ``@pytest.mark.mlflow_server`` and ``slow``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

# The two settings that make the server start fastest here: no background job runner
# (huey consumers), and one uvicorn worker. Telemetry off: no network on test machines.
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


def free_port() -> int:
    """A port nobody listens on right now (the usual bind-to-0 trick; a tiny race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group. Zombies are skipped: after the CLI
    dies its children are reparented to whatever reaps them, which may be slow in a
    container, and a zombie holds no port and no file."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: fall back to signal 0
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the ")" that closes the command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


class MlflowServer:
    """One ``mlflow server`` process group over a sqlite store in ``store_dir``."""

    def __init__(self, store_dir: str | os.PathLike[str], port: int | None = None) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "server.log"
        self.startup_seconds: float | None = None  # of the last start, for reports

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_uri(self) -> str:
        return "sqlite:///" + (self.store_dir / "mlflow.db").as_posix()

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", (self.store_dir / "artifacts").as_uri(),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=timeout) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 180.0) -> MlflowServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(SERVER_ENV)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            # Own session = own process group: stop() kills uvicorn and any helper with it.
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, cwd=self.store_dir,
            )  # fmt: skip
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode} before answering; "
                    f"log tail:\n{self.log_tail()}"
                )
            if self.healthy():
                self.startup_seconds = time.monotonic() - t0
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server on {self.uri} not healthy after {timeout:.0f} s; "
                           f"log tail:\n{self.log_tail()}")  # fmt: skip

    def stop(self, grace: float = 10.0) -> None:
        """Kill the whole process group and wait until no member is left (the CLI's helpers
        outlive it by up to ~10 s otherwise, holding the port and the sqlite file)."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # session leader: its pid is the group id
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not _group_members(pgid):
                    break
                time.sleep(0.1)
            else:
                continue  # survivors: escalate
            break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def restart(self, timeout: float = 180.0) -> MlflowServer:
        """Stop (if running) and start again on the same port over the same store."""
        self.stop()
        return self.start(timeout=timeout)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> MlflowServer:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.stop()


def start_mlflow_server(
    tmp_dir: str | os.PathLike[str], port: int | None = None, timeout: float = 180.0
) -> MlflowServer:
    """Start a server over ``<tmp_dir>/mlflow.db`` (artifacts in ``<tmp_dir>/artifacts``) and
    return it once ``/health`` answers. Use as a context manager or call ``.stop()``."""
    return MlflowServer(tmp_dir, port).start(timeout=timeout)


def mlflow_server_fixture(scope: str = "module") -> Callable[..., Any]:
    """A pytest fixture yielding a running `MlflowServer`; assign it in a test module:
    ``mlflow_server = mlflow_server_fixture()``. A test that stops the server should
    restart it before returning, or use its own `start_mlflow_server`."""

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
        server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
        try:
            yield server
        finally:
            server.stop()

    return _fixture
