"""Config precedence: defaults, then BINSERVE_* env, then CLI flags; validation."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from binserve import settings_doc
from binserve.config import ServerConfig, env_var, flag

ROOT = Path(__file__).resolve().parents[2]


def test_defaults():
    c = ServerConfig()
    assert (c.port, c.max_batch_size, c.max_wait_ms, c.device) == (8000, 32, 0.0, "auto")


def test_env_overrides_defaults_and_flags_override_env():
    env = {"BINSERVE_PORT": "9000", "BINSERVE_MAX_BATCH_SIZE": "16", "BINSERVE_MAX_WAIT_MS": "2.5"}
    assert ServerConfig.from_env(env).port == 9000
    c = ServerConfig.from_args(["--port", "9100", "--workers", "3"], environ=env)
    assert (c.port, c.workers, c.max_batch_size, c.max_wait_ms) == (9100, 3, 16, 2.5)


def test_round_trip_through_env():
    c = ServerConfig(port=8123, models="a=hf_encoder:/x", max_wait_ms=1.5)
    assert ServerConfig.from_env(c.to_env()) == c


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"port": 0}, "port must be at least 1"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"precision": "fp8"}, "precision"),
        ({"runtime": "tensorrt"}, "runtime"),
        ({"min_cosine": 1.5}, "min_cosine"),
        ({"device": "tpu"}, "device"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerConfig(**kwargs)


def test_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match="BINSERVE_PORT must be of type int"):
        ServerConfig.from_env({"BINSERVE_PORT": "eighty"})


def test_every_setting_documents_itself_in_help():
    out = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for f in fields(ServerConfig):
        assert f.metadata["doc"], f"{f.name} has no description"
        assert flag(f) in text and env_var(f) in text, f.name
        words = " ".join(f.metadata["doc"].replace("`", "").split()[:6])
        assert words in text, (f.name, words)
    assert "(ms; > 0, <= 60000; default 500; env BINSERVE_REPOSITORY_POLL_MS)" in text


def test_the_readme_settings_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert settings_doc.with_table(readme) == readme, "run: python -m binserve.settings_doc --write README.md"
    assert "| `max_body_bytes` | `--max-body-bytes` / `BINSERVE_MAX_BODY_BYTES` | 64 MiB | bytes, >= 1 |" in readme


@pytest.mark.parametrize("f", [f for f in fields(ServerConfig) if f.metadata["ge"] is not None], ids=lambda f: f.name)
def test_each_bound_is_enforced_and_named(f):
    with pytest.raises(ValueError, match=f"{f.name} must be at least {f.metadata['ge']}"):
        ServerConfig(**{f.name: f.metadata["ge"] - 1})


def test_the_inflight_budget_must_hold_the_largest_request():
    with pytest.raises(ValueError, match="max_inflight_bytes .* must be at least 5 x max_body_bytes"):
        ServerConfig(max_body_bytes=64 << 20, max_inflight_bytes=256 << 20)
    assert ServerConfig(max_body_bytes=2 << 20, max_inflight_bytes=10 << 20).max_inflight_bytes == 10 << 20
