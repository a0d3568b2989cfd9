"""A real Prometheus server (Debian's package) on a free loopback port, scraping given targets and
loading binserve's rules, for the tests of what an operator and an autoscaler see."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests
import yaml

from tests.serverproc import ROOT, free_port, poll, terminate


class PrometheusProcess:
    """`prometheus` scraping `targets` (host:port, with extra labels) every `interval_s`; stopped by PID."""

    def __init__(self, targets: dict[str, dict], interval_s: float = 1.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus not installed (Debian package 'prometheus'; .ci/run installs it)")
        self.interval_s = interval_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="binserve-prometheus-"))
        every = f"{int(interval_s * 1000)}ms"
        config = {
            "global": {"scrape_interval": every, "evaluation_interval": every, "scrape_timeout": every},
            "rule_files": [str(ROOT / "deploy" / "prometheus" / "binserve-rules.yaml")],
            "scrape_configs": [{
                "job_name": "binserve",
                "static_configs": [{"targets": [t], "labels": labels} for t, labels in targets.items()],
            }],
        }  # fmt: skip
        (self._dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        args = [binary, f"--config.file={self._dir / 'prometheus.yml'}", f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]  # fmt: skip
        self._log = open(self._dir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        poll(self._ready, timeout_s=60, every_s=0.1)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(self._dir / 'prometheus.log').read_text()[-2000:]}")
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector."""
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value an instant query gives, or None when it gives none."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def rules(self) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/rules", timeout=5)
        r.raise_for_status()
        return [rule for group in r.json()["data"]["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        terminate(self.proc, 20)
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PrometheusProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
