"""The two distributions, built and used outside the checkout as a user would: the client alone in a
fresh virtual environment (no torch, no Flask) calling a running server, and the server's wheel
started by its `binserve` command from another directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests

from request_tools import send_inference_request
from tests.serverproc import ROOT, free_port, poll

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The checkout's tracked files, copied: setuptools builds in the source tree (build/, *.egg-info)."""
    out = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, out / name)
    return out


def build_wheel(source: Path, out: Path) -> Path:
    """`pip wheel` of a project directory (its build backend fetched by pip, as for any user)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
                   check=True, capture_output=True)  # fmt: skip
    (wheel,) = out.glob("*.whl")
    return wheel


def test_the_client_installs_alone_and_calls_a_running_server(server, source, tmp_path):
    wheel = build_wheel(source / "client", tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "request_tools.py" in names and "binary_protocol.py" in names and "binserve/wire/safe_pickle.py" in names
    assert "classify_client.py" in names  # the capability server's async client (its [async] extra: aiohttp)
    assert not any(n.startswith(("binserve/api", "binserve/serving", "models/")) for n in names)  # the client only
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(wheel)], check=True, capture_output=True)
    installed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    packages = {line.split("==")[0].lower() for line in installed.stdout.split()}
    assert {"binserve-client", "numpy", "requests"} <= packages and not packages & {"torch", "flask", "gunicorn"}
    elsewhere = tmp_path / "app"
    elsewhere.mkdir()
    script = (
        "from request_tools import send_inference_request\n"
        f"out = send_inference_request({{'texts': ['from an installed client']}}, '{server.base_url}/infer')\n"
        "print(out['embeddings'].shape, out['embeddings'].dtype)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(py), "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 384) float32"


def test_the_server_wheel_runs_from_any_directory_with_its_binserve_command(source, tmp_path):
    wheel = build_wheel(source, tmp_path / "dist")
    zf = zipfile.ZipFile(wheel)
    names = zf.namelist()
    for expected in ("server.py", "binary_protocol.py", "request_tools.py", "binserve/launch.py",
                     "binserve/api/native.py", "models/registry.py", "models/policy_v1/model.safetensors"):  # fmt: skip
        assert expected in names, expected
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "binserve = server:main" in zf.read(entry).decode()
    assert "encoder-server = binserve.encoder_server:main" in zf.read(entry).decode()
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    # document 001's command, from the installed package: every option it lists is documented
    env_only = {k: v for k, v in os.environ.items() if not k.startswith("BINSERVE_")} | {"PYTHONPATH": str(site)}
    helped = subprocess.run([str(site / "bin" / "encoder-server"), "--help"], env=env_only, capture_output=True,
                            text=True, timeout=60, check=True).stdout  # fmt: skip
    for option in ("--models", "--cache-dir", "--host", "--port", "--workers", "--log-level", "--max-batch-size",
                   "--max-wait-time", "--preferred-batch-size", "--max-sequence-length",
                   "--disable-adaptive-batching", "--disable-flash-attention", "--disable-compile",
                   "--disable-better-transformer", "--benchmark", "--benchmark-texts"):  # fmt: skip
        assert option in helped, option
    elsewhere = tmp_path / "srv"
    elsewhere.mkdir()
    port = free_port()
    # the installed package only (not the checkout) on the path; the runtime's dependencies from this venv
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINSERVE_")} | {"PYTHONPATH": str(site)}
    policy = site / "models" / "policy_v1"
    command = [str(site / "bin" / "binserve"), "--port", str(port), "--workers", "1",
               "--models", f"policy=torch_module:{policy}"]  # fmt: skip
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"

            def ready():
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                try:
                    return requests.get(f"{base}/readyz", timeout=2).status_code == 200
                except (requests.ConnectionError, requests.Timeout):
                    return False  # not listening yet, or the worker still booting

            poll(ready, timeout_s=180, every_s=0.5)
            arrays = {"image": np.zeros((480, 640, 3), np.uint8), "state": np.zeros(6, np.float32)}
            assert send_inference_request(arrays, f"{base}/infer/policy")["action"].shape == (2,)
            assert (elsewhere / "model_repository" / "policy" / "CURRENT").is_file()  # relative to where it ran
            banner = (tmp_path / "server.log").read_text()
            assert f"model repository {elsewhere / 'model_repository'}" in banner and "policy: torch_module" in banner
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
