"""A real redis-server (Debian's package) on a free loopback port, for the tests of what replicas share."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest

from tests.serverproc import free_port, poll, terminate


class RedisProcess:
    """`redis-server` with no persistence, started and stopped by PID."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server not installed (Debian package 'redis-server'; .ci/run installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="binserve-redis-")
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", self._dir, "--protected-mode", "yes"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis.from_url(self.url)
        poll(self._pings, timeout_s=20, every_s=0.05)

    def _pings(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    def stop(self) -> None:
        self.client.close()
        terminate(self.proc)
        shutil.rmtree(self._dir, ignore_errors=True)
