"""Hostile resources on real Gunicorn: every request costs a worker at most a small multiple of its size.

Each request shape from the bounded-cost issue (and variations) is sent to one worker serving
MiniLM and the policy model. For each: the status is a 4xx naming the problem (never 500), the
worker's peak RSS growth - VmHWM after resetting it through /proc/<pid>/clear_refs - stays under
256 MiB + 8 x the body, and the worker is the same process afterwards. Then: hundreds of stalled
sockets do not stop /healthz or /infer, and a worker's memory comes back after the heaviest
requests it accepts.
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from binary_protocol import dict_to_binary
from tests.conftest import MODELS
from tests.serverproc import ServerProcess, status_kib

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def srv():
    """One worker, so every request lands on the process whose memory is measured."""
    with ServerProcess(workers=1, models=MODELS, client_timeout_s=2) as s:
        yield s


def worker_pid(srv) -> int:
    return requests.get(f"{srv.base_url}/healthz", timeout=10).json()["pid"]


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def su(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


IMG = np.zeros((480, 640, 3), np.uint8)
STATE = np.zeros(6, np.float32)

# name -> (body, content type, model, chunked, status, error type, words of the message)
CASES = {
    "zero-byte array of 20M rows": (
        lambda: pickle.dumps({"input_ids": np.empty((20_000_000, 0), np.int64)}, protocol=5),
        "application/octet-stream",
        None,
        False,
        413,
        "payload_too_large",
        "holds no data",
    ),
    "zero-byte array of 2**59 rows": (
        lambda: pickle.dumps({"input_ids": np.empty((2**59, 0), np.int64)}, protocol=5),
        "application/octet-stream",
        None,
        False,
        413,
        "payload_too_large",
        "holds no data",
    ),
    "zero-byte array of 2**59 rows, framed": (
        lambda: dict_to_binary({"input_ids": np.empty((2**59, 0), np.int64)}),
        "application/x-binserve",
        None,
        False,
        413,
        "payload_too_large",
        "holds no data",
    ),
    "16M MEMOIZE opcodes": (
        lambda: b"\x80\x05}" + b"\x94" * (16 * MiB) + b".",
        "application/octet-stream",
        None,
        False,
        413,
        "payload_too_large",
        "pickle opcodes",
    ),
    "1 MiB bytes referenced 2000 times": (
        lambda: pickle.dumps({"texts": [b"x" * MiB] * 2000}, protocol=5),
        "application/octet-stream",
        None,
        False,
        413,
        "payload_too_large",
        "decodes into more than",
    ),
    "256 KiB text referenced 256 times": (
        lambda: pickle.dumps({"texts": ["a " * (128 * 1024)] * 256}, protocol=5),
        "application/octet-stream",
        None,
        False,
        413,
        "payload_too_large",
        "decodes into more than",
    ),
    "one image pickled 1500 times by reference": (
        lambda: pickle.dumps({"image": [IMG] * 1500, "state": [STATE] * 1500}, protocol=5),
        "application/octet-stream",
        "policy",
        False,
        413,
        "payload_too_large",
        "decodes into more than",
    ),
    "one image, 100 references in a frame": (
        lambda: dict_to_binary({"image": [IMG] * 100, "state": [STATE] * 100}),
        "application/x-binserve",
        "policy",
        False,
        413,
        "payload_too_large",
        "decodes into more than",
    ),
    "16 MB of JSON empty lists": (
        lambda: b'{"texts": [' + b"[]," * (16 * 1000 * 1000 // 3) + b"[]]}",
        "application/json",
        None,
        False,
        413,
        "payload_too_large",
        "limit",
    ),
    "4 MB of JSON empty lists, under the JSON limit": (
        lambda: b'{"texts": [' + b"[]," * (4 * 1000 * 1000 // 3) + b"[]]}",
        "application/json",
        None,
        False,
        413,
        "payload_too_large",
        "one request may hold at most",
    ),
    "lone surrogate in a pickle": (
        lambda: pickle.dumps({"texts": ["\ud800"]}, protocol=5),
        "application/octet-stream",
        None,
        False,
        400,
        "protocol_error",
        "not valid UTF-8",
    ),
    "lone surrogate in JSON": (
        lambda: b'{"texts": ["ok", "\\udc00"]}',
        "application/json",
        None,
        False,
        400,
        "protocol_error",
        "not valid UTF-8",
    ),
    "5000 texts in one request": (
        lambda: pickle.dumps({"texts": ["hello world"] * 5000}, protocol=5),
        "application/octet-stream",
        None,
        False,
        413,
        "payload_too_large",
        "one request may hold at most",
    ),
    "5000 token rows as an array": (
        lambda: dict_to_binary({"input_ids": np.ones((5000, 8), np.int64)}),
        "application/x-binserve",
        None,
        False,
        413,
        "payload_too_large",
        "one request may hold at most",
    ),
    "chunked body of 72 MiB": (
        lambda: b"\x80\x05" + b"N0" * (36 * MiB),
        "application/octet-stream",
        None,
        True,
        413,
        "payload_too_large",
        "over the",
    ),
    "body of 72 MiB with a Content-Length": (
        lambda: b"\x80\x05" + b"N0" * (36 * MiB),
        "application/octet-stream",
        None,
        False,
        413,
        "payload_too_large",
        "over the",
    ),
    "32 MiB of NONE/POP opcodes": (
        lambda: b"\x80\x05" + b"N0" * (16 * MiB) + b"}.",
        "application/octet-stream",
        None,
        False,
        413,
        "payload_too_large",
        "pickle opcodes",
    ),
    "list nesting bomb": (
        lambda: b"\x80\x05" + b"]" * 200_000 + b"a" * 199_999 + b"0}.",
        "application/octet-stream",
        None,
        False,
        400,
        "protocol_error",
        "items on the stack",
    ),
    "declared 2**62-byte bytes": (
        lambda: b"\x80\x05\x8e" + struct.pack("<Q", 2**62) + b"xx.",
        "application/octet-stream",
        None,
        False,
        400,
        "protocol_error",
        "declares",
    ),
    "17 MiB string": (
        lambda: pickle.dumps({"texts": ["s" * (17 * MiB)]}, protocol=5),
        "application/octet-stream",
        None,
        False,
        413,
        "payload_too_large",
        "over the",
    ),
    "an ordinary request": (
        lambda: pickle.dumps({"texts": ["still fine"] * 8}, protocol=5),
        "application/octet-stream",
        None,
        False,
        200,
        None,
        None,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_request_costs_at_most_a_small_multiple_of_its_size(srv, name):
    make, ctype, model, chunked, status, error_type, words = CASES[name]
    body = make()
    pid = worker_pid(srv)
    reset_peak(pid)
    before = status_kib(pid, "VmRSS")
    url = f"{srv.base_url}/infer" + (f"/{model}" if model else "")
    data = (body[i : i + MiB] for i in range(0, len(body), MiB)) if chunked else body
    try:
        r = requests.post(url, data=data, headers={"Content-Type": ctype}, timeout=120)
    except requests.ConnectionError:
        pytest.fail(f"{name}: the connection broke instead of a reply")
    growth = (status_kib(pid, "VmHWM") - before) * 1024
    assert r.status_code == status, r.text[:300]
    if error_type:
        err = r.json()["error"]
        assert err["type"] == error_type and words in err["message"], err
        assert "Traceback" not in r.text and "/work/" not in r.text and ".py" not in r.text
    assert growth <= 256 * MiB + 8 * len(body), f"peak RSS grew {growth / MiB:.0f} MiB for a {len(body)}-byte body"
    assert worker_pid(srv) == pid, "the worker was replaced"


def test_no_500_from_any_of_them_in_the_metrics(srv):
    text = requests.get(f"{srv.base_url}/metrics", timeout=10).text
    assert 'code="500"' not in text


def _stall(port: int, in_body: bool) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    if in_body:
        s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    else:
        s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Ty")
    return s


def test_200_stalled_sockets_do_not_stop_the_server(srv):
    socks = [_stall(srv.port, in_body=i % 2 == 1) for i in range(200)]
    try:
        t0 = time.monotonic()
        r = requests.get(f"{srv.base_url}/healthz", timeout=5)
        assert r.status_code == 200
        r = requests.post(f"{srv.base_url}/infer", json={"texts": ["answered while 200 sockets stall"]}, timeout=5)
        assert r.status_code == 200 and len(r.json()["embeddings"][0]) == 384
        assert time.monotonic() - t0 < 5
        # and the stalled ones are cut after client_timeout_s (2 s here) with a 408
        for s in (socks[0], socks[1]):
            s.settimeout(10)
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408 "), reply[:100]
            assert b"request_timeout" in reply
    finally:
        for s in socks:
            s.close()


def test_a_slow_but_steady_client_is_served(srv):
    """A body that arrives in pieces, each within client_timeout_s, is a client, not an attack -
    even when the whole body takes longer than client_timeout_s (2 s here): each piece that
    arrives moves the deadline."""
    body = b'{"texts": ["sent in pieces"]}'
    s = socket.create_connection(("127.0.0.1", srv.port))
    try:
        s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        s.sendall(f"Content-Length: {len(body)}\r\n\r\n".encode())
        t0 = time.monotonic()
        for i in range(0, len(body), 3):
            time.sleep(0.3)  # the client's pace between pieces, not a wait for the server
            s.sendall(body[i : i + 3])
        assert time.monotonic() - t0 > 2.5  # longer in total than client_timeout_s
        s.settimeout(30)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"]]}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    finally:
        s.close()


def test_expect_continue_is_answered(srv):
    body = b'{"texts": ["expect continue"]}'
    s = socket.create_connection(("127.0.0.1", srv.port))
    try:
        s.sendall(
            b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        s.close()


def test_memory_comes_back_after_the_heaviest_accepted_requests(srv):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 480, 640, 3), dtype=np.uint8)
    states = rng.standard_normal((60, 6)).astype(np.float32)
    texts = [f"lorem ipsum {i} " * 600 for i in range(128)]  # 1 MB of text, each cut to 256 tokens
    pid = worker_pid(srv)
    warm = [
        (f"{srv.base_url}/infer/policy", dict_to_binary({"image": images[:4], "state": states[:4]}), "x-binserve"),
        (f"{srv.base_url}/infer", dict_to_binary({"texts": texts[:32]}), "x-binserve"),
    ]
    for url, body, ctype in warm * 2:
        assert requests.post(url, data=body, headers={"Content-Type": f"application/{ctype}"}, timeout=120).ok
    baseline = status_kib(pid, "VmRSS") * 1024
    heavy = [
        (f"{srv.base_url}/infer/policy", dict_to_binary({"image": images, "state": states}), "x-binserve"),
        (f"{srv.base_url}/infer/policy", pickle.dumps({"image": images, "state": states}, protocol=5), "octet-stream"),
        (f"{srv.base_url}/infer", dict_to_binary({"texts": texts}), "x-binserve"),
    ]
    reset_peak(pid)

    def post(h):
        url, body, ctype = h
        headers = {"Content-Type": f"application/{ctype}", "X-Request-Timeout-Ms": "240000"}
        return requests.post(url, data=body, headers=headers, timeout=300)

    for _ in range(2):  # twice: the second round must not keep more than the first
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(post, heavy))
        assert [r.status_code for r in replies] == [200, 200, 200], [r.text[-200:] for r in replies]
    peak = status_kib(pid, "VmHWM") * 1024
    after = status_kib(pid, "VmRSS") * 1024
    assert peak - baseline > 100 * MiB, "the heavy requests did not load the worker; the test proves nothing"
    assert after - baseline < 64 * MiB, (
        f"RSS {baseline / MiB:.0f} MiB before, {peak / MiB:.0f} at peak, {after / MiB:.0f} after"
    )
