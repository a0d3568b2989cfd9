"""The server's hung-up-client check on a real socket pair."""

from __future__ import annotations

import socket

from binserve.api.pipeline import client_gone_check as _client_gone_check


def test_open_connection_is_not_gone_even_with_pipelined_data():
    a, b = socket.socketpair()
    try:
        gone = _client_gone_check({"gunicorn.socket": a})
        assert gone() is False
        b.sendall(b"GET /next HTTP/1.1\r\n")  # a keep-alive client's next request is not a hang-up
        assert gone() is False
        assert a.recv(100).startswith(b"GET")  # and the peek consumed nothing
    finally:
        a.close()
        b.close()


def test_closed_client_is_gone():
    a, b = socket.socketpair()
    gone = _client_gone_check({"gunicorn.socket": a})
    b.close()
    assert gone() is True
    a.close()
    assert gone() is True  # a socket that errors counts as gone


def test_no_socket_means_no_check():
    assert _client_gone_check({}) is None
