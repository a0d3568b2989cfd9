"""request_tools against a small real HTTP server on loopback: replies, retries, typed errors, timeouts."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests

from binary_protocol import FRAMED, JSON, decode_body, encode_body, reply_format
from binserve import errors
from request_tools import InferenceClient, send_inference_request


class ScriptedServer:
    """Answers POSTs from a script of (status, headers, body-or-None) steps; None echoes the payload."""

    def __init__(self):
        self.script: list = []
        self.requests: list[tuple[str, dict, bytes]] = []
        self.delay_s = 0.0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.requests.append((self.path, dict(self.headers), body))
                if owner.delay_s:
                    time.sleep(owner.delay_s)  # a slow model, to exercise the client's timeout
                status, headers, reply = owner.script.pop(0) if owner.script else (200, {}, None)
                cut = status == "cut"  # a 200 whose body stops halfway: the server died while sending it
                status = 200 if cut else status
                headers = dict(headers)
                ctype = headers.pop("Content-Type", "application/json")
                if reply is None:
                    data, fmt = decode_body(body, self.headers.get("Content-Type"))
                    reply, ctype = encode_body(data, reply_format(fmt, self.headers.get("Accept")))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(reply)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(reply[: len(reply) // 2] if cut else reply)
                if cut:
                    self.wfile.flush()
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def error_body(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"type": kind, "message": message}}).encode()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def test_round_trip_framed(server):
    data = {"image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3), "texts": ["a", "b"], "ids": [[1, 2], [3]]}
    with InferenceClient(server.base_url) as client:
        out = client.infer(data, model="policy", timeout_ms=250)
    assert np.array_equal(out["image"], data["image"]) and out["texts"] == ["a", "b"] and out["ids"] == [[1, 2], [3]]
    path, headers, _ = server.requests[0]
    assert path == "/infer/policy"
    assert headers["Content-Type"] == "application/x-binserve"
    assert headers["X-Request-Timeout-Ms"] == "250"


def test_round_trip_json(server):
    with InferenceClient(server.base_url, fmt=JSON) as client:
        assert client.infer({"x": np.arange(3)}) == {"x": [0, 1, 2]}


def test_send_inference_request_url_forms(server):
    assert send_inference_request({"a": 1}, f"{server.base_url}/infer")["a"] == 1
    assert send_inference_request({"a": 2}, f"{server.base_url}/infer/m1")["a"] == 2
    assert send_inference_request({"a": 3}, f"{server.base_url}/infer", model="m2")["a"] == 3
    assert [r[0] for r in server.requests] == ["/infer", "/infer/m1", "/infer/m2"]
    with pytest.raises(ValueError, match="must end in /infer"):
        send_inference_request({"a": 1}, f"{server.base_url}/predict")


def test_bearer_token_is_sent(server):
    send_inference_request({"a": 1}, f"{server.base_url}/infer", token="s3cret")
    assert server.requests[0][1]["Authorization"] == "Bearer s3cret"


def test_429_is_retried_honouring_retry_after(server):
    server.script = [(429, {"Retry-After": "0.2"}, error_body("overloaded", "queue full"))]
    t0 = time.monotonic()
    out = send_inference_request({"a": 1}, f"{server.base_url}/infer", retries=2)
    assert out == {"a": 1}
    assert len(server.requests) == 2
    assert time.monotonic() - t0 >= 0.2


def test_503_retries_run_out_into_a_typed_error(server):
    server.script = [(503, {"Retry-After": "0"}, error_body("not_ready", "warming up"))] * 3
    with pytest.raises(errors.NotReady, match="warming up") as info:
        send_inference_request({"a": 1}, f"{server.base_url}/infer", retries=2)
    assert info.value.status_code == 503 and info.value.retry_after_s == 0
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "status,kind,cls",
    [
        (400, "invalid_input", errors.InvalidInput),
        (400, "protocol_error", errors.ProtocolError),
        (401, "unauthorized", errors.Unauthorized),
        (404, "model_not_found", errors.ModelNotFound),
        (413, "payload_too_large", errors.PayloadTooLarge),
        (500, "model_error", errors.ModelFailure),
        (504, "deadline_exceeded", errors.DeadlineExceeded),  # the server's own: its deadline passed
        (507, "insufficient_storage", errors.InsufficientStorage),
        (418, None, errors.ServingError),
    ],
)
def test_errors_are_typed_and_not_retried(server, status, kind, cls):
    body = error_body(kind, "what went wrong") if kind else b"<html>bad gateway</html>"
    server.script = [(status, {}, body)]
    with pytest.raises(cls) as info:
        send_inference_request({"a": 1}, f"{server.base_url}/infer", retries=3)
    assert info.value.status_code == status
    assert ("what went wrong" if kind else "bad gateway") in str(info.value)
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [502, 504])
def test_a_gateways_502_and_504_are_retried_and_counted(server, status):
    """A load balancer answers these (HTML) when the replica under a request died or hung."""
    server.script = [(status, {"Content-Type": "text/html"}, b"<html>bad gateway</html>")]
    with InferenceClient(server.base_url, retries=2, backoff_s=0.0) as client:
        assert client.infer({"a": 1}) == {"a": 1}
        assert client.retried == 1 and len(server.requests) == 2
        server.script = [(status, {"Content-Type": "text/html"}, b"<html>bad gateway</html>")] * 3
        with pytest.raises(errors.ServingError) as info:
            client.infer({"a": 1})
        assert info.value.status_code == status and client.retried == 3


def test_a_reply_cut_off_mid_body_is_retried(server):
    """A worker killed while it sends the reply: the body stops short (requests raises
    ChunkedEncodingError, not ConnectionError). Inference is idempotent: sent again."""
    server.script = [("cut", {}, None)]
    with InferenceClient(server.base_url, retries=2, backoff_s=0.0) as client:
        assert client.infer({"a": np.arange(1000)})["a"].tolist() == list(range(1000))
        assert client.retried == 1 and len(server.requests) == 2


def test_connection_refused_is_retried_then_raised(monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = []
    monkeypatch.setattr(InferenceClient, "_sleep_before_retry", lambda self, attempt, hint: sleeps.append(attempt))
    with pytest.raises(requests.ConnectionError):
        send_inference_request({"a": 1}, f"http://127.0.0.1:{port}/infer", retries=2)
    assert sleeps == [0, 1]


def test_read_timeout_is_not_retried(server):
    server.delay_s = 1.0
    t0 = time.monotonic()
    with pytest.raises(requests.Timeout):
        send_inference_request({"a": 1}, f"{server.base_url}/infer", timeout=0.2, retries=3)
    assert time.monotonic() - t0 < 1.0
    assert len(server.requests) == 1


def test_reply_carries_headers(server):
    server.script = [(200, {"X-Model-Version": "3", "X-Batch-Size": "7", "X-Request-Id": "r1"}, None)]
    with InferenceClient(server.base_url) as client:
        reply = client.request({"a": 1})
    assert (reply.model_version, reply.batch_size, reply.request_id) == ("3", 7, "r1")
    assert reply.outputs == {"a": 1}


def test_reply_headers_are_read_whatever_their_case(server):
    """HAProxy and HTTP/2 proxies send header names lowercase."""
    server.script = [(200, {"x-model-version": "4", "x-batch-size": "2", "x-request-id": "r2"}, None)]
    with InferenceClient(server.base_url) as client:
        reply = client.request({"a": 1})
    assert (reply.model_version, reply.batch_size, reply.request_id) == ("4", 2, "r2")


def test_client_rejects_unknown_format():
    with pytest.raises(ValueError, match="fmt must be one of"):
        InferenceClient(fmt="xml")
    assert FRAMED == "binserve"
