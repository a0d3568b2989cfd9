"""Start and stop a real binserve (Gunicorn) on a free loopback port, for integration and load tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from binserve.process import coreshare

ROOT = Path(__file__).resolve().parent.parent
_SHARED_CACHE = tempfile.mkdtemp(prefix="binserve-test-cache-")
#: settings every server started by this process gets unless it is given its own: tests/conftest.py
#: turns torch.compile off there (each test model's first plan would compile for 20-50 s; the compiled
#: engine has tests of its own), benchmarks start servers on binserve's defaults
DEFAULTS: dict = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(fn, timeout_s: float = 60.0, every_s: float = 0.1):
    """fn() until it returns something truthy (polling a server's state, not waiting for readiness)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{fn} did not become true in {timeout_s}s")


def terminate(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM a helper server the tests started (redis, Prometheus, HAProxy); SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def status_kib(pid: int, field: str) -> int:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class ServerProcess:
    """`python server.py` as a user starts it; `start()` returns once every worker is ready."""

    def __init__(
        self,
        workers: int = 2,
        models: str = "",
        log_path: Path | None = None,
        env: dict | None = None,
        root: Path | None = None,
        command: list[str] | None = None,
        port: int | None = None,
        **settings,
    ) -> None:
        #: the checkout whose server.py runs (benchmarks compare two checkouts side by side)
        self.root = Path(root) if root else ROOT
        self.port = port or free_port()
        #: a command line of a source document's, as written (then `settings` travel as BINSERVE_* variables)
        self.command = command
        for key, value in DEFAULTS.items():
            settings.setdefault(key, value)
        # each server gets its own model repository unless a test shares one on purpose
        settings.setdefault("model_repository", tempfile.mkdtemp(prefix="binserve-repo-"))
        # Test servers share one cache of ONNX exports and engine timings (content-keyed, so safe to
        # share); pass cache_dir="" to use the default, the version's own .cache.
        settings.setdefault("cache_dir", _SHARED_CACHE)
        if settings["cache_dir"] == "":
            del settings["cache_dir"]
        self.repository = Path(settings["model_repository"])
        self.workers = coreshare.worker_count(workers)  # 0: as many as the server picks
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        if models:
            args += ["--models", models]
        for k, v in settings.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        self.args = args
        self.log_path = log_path or Path(os.environ.get("BINSERVE_TEST_LOG_DIR", "/tmp")) / f"binserve-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.extra_env = env or {}
        if command is not None:
            self.extra_env = {f"BINSERVE_{k.upper()}": str(v) for k, v in settings.items()} | self.extra_env

    def start(self, timeout_s: float = 180.0, wait: bool = True) -> ServerProcess:
        """Start the server; with `wait`, return once every worker is ready (else at once)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BINSERVE_")} | self.extra_env
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command or [sys.executable, str(self.root / "server.py"), *self.args],
            cwd=self.root,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        pids_file = os.environ.get("BINSERVE_TEST_PIDS_FILE")
        if pids_file:  # a driver that may be killed (bench/gpu_check.sh) stops what it started by these
            with open(pids_file, "a") as f:
                f.write(f"{self.proc.pid}\n")
        if not wait:
            return self
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()  # a server that failed to come up must not outlive the test
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Poll /readyz until `workers` distinct worker pids have answered 200 (no sleeps)."""
        ready_pids: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_tail()}")
            try:
                # a new connection each time, so that every worker gets asked
                r = requests.get(f"{self.base_url}/readyz", timeout=2, headers={"Connection": "close"})
                if r.status_code == 200:
                    ready_pids.add(r.json()["pid"])
                    if len(ready_pids) >= self.workers:
                        return
                elif r.json().get("status", "").startswith("failed"):
                    raise RuntimeError(f"model load failed: {r.json()}")
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or the worker is busy loading; ask again
            time.sleep(0.05)  # polling interval between readiness probes, not a wait for readiness
        raise TimeoutError(f"server not ready after {timeout_s}s; log: {self.log_tail()}")

    def wait_failed(self, timeout_s: float = 120.0) -> dict:
        """Poll /readyz until the server says a model failed to load; its JSON (status, models)."""

        def failed():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_tail()}")
            try:
                r = requests.get(f"{self.base_url}/readyz", timeout=5, headers={"Connection": "close"})
            except (requests.ConnectionError, requests.Timeout):
                return None
            return r.status_code == 503 and r.json().get("status", "").startswith("failed") and r.json()

        return poll(failed, timeout_s)

    def worker_pids(self) -> list[int]:
        """The Gunicorn master's children: its workers, by pid."""
        children: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            children += [int(p) for p in (task / "children").read_text().split()]
        return sorted(children)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the Gunicorn master (graceful), then SIGKILL its group if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # workers are in the master's session: make sure none is left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
