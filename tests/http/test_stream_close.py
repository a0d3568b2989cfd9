"""A streamed generation whose reader closes the stream stops generating, with no socket check to
help: Flask's test client has no socket (client_gone_check gives none), so only the stream's own
close (the WSGI server closing the response when the client is gone) can stop the sequence.
The batch thread's socket check alone is tested in tests/unit/test_generation.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from binserve.config import ServerConfig
from binserve.scheduling.continuous import ContinuousBatcher
from binserve.scheduling.contract import BatchSettings
from models.example_causal_lm import write_causal_lm
from models.registry import ModelSpec, load_model
from server import create_app
from tests.http.fakes import FakeManager
from tests.serverproc import poll


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return write_causal_lm(tmp_path_factory.mktemp("lm") / "tiny", layers=2, hidden=64)


@pytest.mark.parametrize("route", ["/v1/completions", "/generate"])
def test_closing_the_stream_stops_the_sequence(lm_dir, route):
    adapter = load_model(ModelSpec("lm", "hf_causal_lm", str(lm_dir)), torch.device("cpu"))
    # no end-of-sequence token, so only a cancel can end it before max tokens
    batcher = ContinuousBatcher(adapter._model, adapter.tokenizer, torch.device("cpu"), BatchSettings(16, 32768),
                                eos_ids=()).start()  # fmt: skip
    seqs = []
    submit = batcher.submit_sequence
    batcher.submit_sequence = lambda seq: (seqs.append(seq), submit(seq))[1]
    manager = FakeManager()
    served = SimpleNamespace(name="lm", adapter=adapter, signature={}, scheduler=batcher, cacheable=False)
    manager._models["lm"] = served
    manager.names.append("lm")
    try:
        client = create_app(ServerConfig(), manager=manager).test_client()
        body = {"model": "lm", "prompt": "the quick brown fox", "max_tokens": 500, "stream": True}
        resp = client.post(route, json=body, buffered=False)
        assert resp.status_code == 200, resp.get_data()[:300]
        first = next(iter(resp.response))
        assert first.strip()
        resp.close()  # the client went away: the server closes the response's generator
        (seq,) = seqs
        poll(lambda: seq.finish_reason is not None, timeout_s=30, every_s=0.01)
        assert seq.finish_reason == "cancelled" and len(seq.output) < 500, (seq.finish_reason, len(seq.output))
        assert poll(lambda: batcher.counts() == (0, 0), timeout_s=10)
    finally:
        batcher.close()
        manager.close()
