"""Config precedence: defaults, then BINSERVE_* env, then CLI flags; validation."""

from __future__ import annotations

import pytest

from binserve.config import ServerConfig


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
