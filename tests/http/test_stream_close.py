"""A streamed generation whose reader closes the stream stops generating, with no socket check to
help: Flask's test client has no socket (client_gone_check gives none), so only the stream's own
close (the WSGI server closing the response when the client is gone) can stop the sequence.
The batch thread's socket check alone is tested in tests/unit/test_generation.py."""

from __future__ import annotations

import pytest

from tests.serverproc import poll


@pytest.mark.parametrize("route", ["/v1/completions", "/generate"])
def test_closing_the_stream_stops_the_sequence(lm_manager, make_client, route):
    batcher = lm_manager.get("lm").scheduler
    client = make_client()
    body = {"model": "lm", "prompt": "the quick brown fox", "max_tokens": 500, "stream": True}
    resp = client.post(route, json=body, buffered=False)
    assert resp.status_code == 200, resp.get_data()[:300]
    first = next(iter(resp.response))
    assert first.strip()
    resp.close()  # the client went away: the server closes the response's generator
    (seq,) = batcher.submitted
    poll(lambda: seq.finish_reason is not None, timeout_s=30, every_s=0.01)
    assert seq.finish_reason == "cancelled" and len(seq.output) < 500, (seq.finish_reason, len(seq.output))
    assert poll(lambda: batcher.counts() == (0, 0), timeout_s=10)
