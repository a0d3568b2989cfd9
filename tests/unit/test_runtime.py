"""The device runner's CPU path, autocast on the CPU, device selection and threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from binserve.config import ServerConfig
from binserve.process.runtime import DeviceRunner, configure_threads, select_device

CPU = torch.device("cpu")


def test_cpu_runner_is_plain_numpy_and_torch():
    r = DeviceRunner(CPU)
    a = r.staging("x", (2, 3), np.int64)
    a[:] = np.arange(6).reshape(2, 3)
    t = r.to_device({"x": a})["x"]
    assert t.dtype == torch.int64 and np.shares_memory(t.numpy(), a)  # no copy on the CPU
    out = r.to_host(r.forward(lambda d: {"y": d["x"].to(torch.float64) * 2}, {"x": t}))
    assert out["y"].dtype == np.float32 and out["y"].tolist() == [[0, 2, 4], [6, 8, 10]]
    assert torch.is_inference_mode_enabled() is False
    assert r.memory_bytes() is None


def test_cpu_autocast_is_per_call():
    r = DeviceRunner(CPU)
    w = torch.randn(4, 4)
    x = torch.randn(2, 4)
    plain = r.forward(lambda a: a @ w, x)
    lowered = r.forward(lambda a: a @ w, x, autocast=torch.bfloat16)
    assert plain.dtype == torch.float32 and lowered.dtype == torch.bfloat16
    assert torch.allclose(lowered.float(), plain, rtol=0.05, atol=0.05)


def test_select_device_and_threads():
    assert select_device(ServerConfig(device="cpu")) == CPU
    if not torch.cuda.is_available():
        assert select_device(ServerConfig(device="auto")) == CPU
    assert configure_threads(ServerConfig(torch_threads=1)) == 1 and torch.get_num_threads() == 1


def test_in_fresh_thread_runs_on_a_thread_that_ends_and_hands_back_what_it_gave():
    import threading

    from binserve.process.runtime import in_fresh_thread

    seen = []
    assert in_fresh_thread(lambda a, b: seen.append(threading.current_thread()) or a + b, 2, 3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError, match="missing"):
        in_fresh_thread(lambda: {}["missing"])
