"""A replica test bed on one machine: containers of the real image on a shared model-repository
volume (one writer, the others read-only, as deployment.yaml runs them) behind a real HAProxy
(Debian's) that health-checks `/readyz`, and a bounded load of `request_tools` clients through it.

design: everything listens on loopback (published container ports, HAProxy's frontend and its
CSV stats page); containers, volumes and HAProxy are started here and removed by name and PID.
HAProxy opens one server connection per request (`http-server-close`), so a replica that closes
its listener on SIGTERM is seen as a connection failure, which it redispatches to another
replica; it does not replay a request a replica accepted (only the client may, for inference).
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.container.test_image import IMAGE, Container, docker
from tests.serverproc import free_port, poll, terminate
from tests.steadyload import TEXTS, Load


class Replicas:
    """`n` containers of the image (the first the writer) on one repository volume."""

    def __init__(
        self, n: int = 3, env: dict | None = None, writer_args: tuple = (), writer_env: dict | None = None
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        self.volume, self.status = f"binserve-bed-models-{tag}", f"binserve-bed-status-{tag}"
        # drain_delay_s: HAProxy marks a server down within two 250 ms checks of /readyz's 503;
        # time to spare before the listener closes (Kubernetes' preStop delay does this there)
        self.env = {"BINSERVE_WORKERS": "1", "BINSERVE_REPOSITORY_POLL_MS": "200", "BINSERVE_REPORT_DIR": "/status",
                    "BINSERVE_DRAIN_DELAY_S": "2", **(env or {})}  # fmt: skip
        self.n = n
        self.writer_args, self.writer_env = writer_args, writer_env or {}
        self.containers: list[Container] = []

    def __enter__(self) -> Replicas:
        for v in (self.volume, self.status):
            docker("volume", "create", v)
        try:
            for i in range(self.n):
                mounts = ["-v", f"{self.volume}:/models{'' if i == 0 else ':ro'}", "-v", f"{self.status}:/status"]
                extra = list(self.writer_args) if i == 0 else []
                env = {**self.env, **self.writer_env} if i == 0 else self.env
                c = Container(*mounts, *extra, env=env)
                docker(*c.args)  # all start at once; readiness is polled below
                self.containers.append(c)
            for c in self.containers:
                wait_ready(c)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for c in self.containers:
            docker("rm", "-f", c.name, check=False)
        docker("volume", "rm", "-f", self.volume, self.status, check=False)


def wait_ready(c: Container, timeout_s: float = 240) -> None:
    """Until the container's worker answers /readyz 200 (its one worker: BINSERVE_WORKERS=1)."""

    def ready() -> bool:
        if docker("inspect", "-f", "{{.State.Running}}", c.name) != "true":
            raise RuntimeError(f"{c.name} exited: {c.logs()}")
        try:
            return requests.get(f"{c.url}/readyz", timeout=2, headers={"Connection": "close"}).status_code == 200
        except requests.RequestException:
            return False

    poll(ready, timeout_s=timeout_s, every_s=0.25)


class HAProxy:
    """HAProxy in front of `servers` (host:port), health-checking /readyz every 250 ms."""

    def __init__(self, servers: list[str]) -> None:
        binary = shutil.which("haproxy")
        if binary is None:
            pytest.skip("haproxy not installed (Debian package 'haproxy'; .ci/run installs it)")
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="binserve-haproxy-"))
        lines = [
            "global", "  maxconn 4096",
            "defaults", "  mode http", "  timeout connect 2s", "  timeout client 120s", "  timeout server 120s",
            "  option http-server-close", "  retries 3", "  option redispatch 1",
            # a connection refused (a replica closing its listener) or a 503 (one draining, before its
            # check fails) means the request was not processed: safe to send to another replica
            "  retry-on conn-failure 503",
            "frontend inference", f"  bind 127.0.0.1:{self.port}", "  default_backend replicas",
            "backend replicas", "  balance leastconn", "  http-response set-header X-Served-By %s",
            "  option httpchk GET /readyz", "  http-check expect status 200",
            # a check every 250 ms, down after two failures: one /readyz answered slowly by a replica
            # busy under load (timeout check 1 s) does not take it out, a draining one is out in 0.5 s
            "  timeout check 1s", "  default-server inter 250ms fastinter 250ms downinter 250ms fall 2 rise 1",
            *[f"  server r{i} {s} check" for i, s in enumerate(servers)],
            "listen stats", f"  bind 127.0.0.1:{self.stats_port}", "  stats enable", "  stats uri /stats",
        ]  # fmt: skip
        (self._dir / "haproxy.cfg").write_text("\n".join(lines) + "\n")
        check = subprocess.run([binary, "-c", "-f", str(self._dir / "haproxy.cfg")], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(check.stdout + check.stderr)
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self._dir / "haproxy.cfg")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        poll(lambda: self._stats_up() and all(v == "UP" for v in self.states().values()), timeout_s=30)

    def _stats_up(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stats(self) -> dict[str, dict]:
        """HAProxy's CSV stats of each server of the backend, by server name."""
        text = requests.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text.lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            r["svname"]: r for r in rows if r["pxname"] == "replicas" and r["svname"] not in ("FRONTEND", "BACKEND")
        }

    def states(self) -> dict[str, str]:
        """UP / DOWN (and transitions) of each server."""
        return {name: row["status"].split()[0] for name, row in self.stats().items()}

    def stop(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_state(lb: HAProxy, server: str, state: str, timeout_s: float = 60) -> float:
    """Seconds until HAProxy shows `server` in `state`."""
    t0 = time.monotonic()
    poll(lambda: lb.states().get(server) == state, timeout_s=timeout_s, every_s=0.05)
    return time.monotonic() - t0


__all__ = ["IMAGE", "TEXTS", "HAProxy", "Load", "Replicas", "docker", "wait_ready", "wait_state"]
