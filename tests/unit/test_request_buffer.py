"""The event loop's request buffer: when is an HTTP/1.x request complete, fed a byte at a time or whole."""

from __future__ import annotations

import pytest

from binserve.process.http_worker import (
    BODY_TOO_LARGE,
    COMPLETE,
    HEADERS_TOO_LARGE,
    MALFORMED,
    MAX_HEADER_BYTES,
    NEED_MORE,
    RequestBuffer,
)

HEAD = b"POST /infer HTTP/1.1\r\nHost: x\r\n"


def feed_bytewise(raw: bytes, **kw) -> list[str]:
    rb = RequestBuffer(1000, **kw)
    return [rb.feed(raw[i : i + 1]) for i in range(len(raw))]


def test_request_without_body_is_complete_after_headers():
    raw = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    statuses = feed_bytewise(raw)
    assert statuses[-1] == COMPLETE and set(statuses[:-1]) == {NEED_MORE}


def test_content_length_body_is_complete_at_its_last_byte():
    raw = HEAD + b"Content-Length: 5\r\n\r\nhello"
    statuses = feed_bytewise(raw)
    assert statuses[-1] == COMPLETE and set(statuses[:-1]) == {NEED_MORE}


def test_stalled_halfway_is_not_complete():
    rb = RequestBuffer(1000)
    assert rb.feed(HEAD + b"Content-Length: 10\r\n\r\nhalf") == NEED_MORE
    assert RequestBuffer(1000).feed(HEAD + b"Content-Ty") == NEED_MORE


def test_chunked_body_is_complete_after_the_last_chunk_and_trailers():
    raw = HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    statuses = feed_bytewise(raw)
    assert statuses[-1] == COMPLETE and set(statuses[:-1]) == {NEED_MORE}
    with_trailer = HEAD + b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-Sum: 1\r\n\r\n"
    assert RequestBuffer(1000).feed(with_trailer) == COMPLETE
    assert RequestBuffer(1000).feed(with_trailer[:-2]) == NEED_MORE


def test_chunk_sizes_adding_up_past_the_limit_are_too_large_before_the_data_arrives():
    rb = RequestBuffer(1000)
    assert rb.feed(HEAD + b"Transfer-Encoding: chunked\r\n\r\n200\r\n" + b"x" * 512 + b"\r\n") == NEED_MORE
    assert rb.feed(b"300\r\n") == BODY_TOO_LARGE  # 0x200 + 0x300 = 1280 > 1000, nothing of it read yet


def test_declared_length_over_the_limit_is_known_from_the_headers():
    assert RequestBuffer(1000).feed(HEAD + b"Content-Length: 1001\r\n\r\n") == BODY_TOO_LARGE


def test_json_has_its_own_limit():
    json_head = HEAD + b"Content-Type: application/json; charset=utf-8\r\n"
    assert RequestBuffer(1000, max_json_bytes=100).feed(json_head + b"Content-Length: 101\r\n\r\n") == BODY_TOO_LARGE
    assert RequestBuffer(1000, max_json_bytes=100).feed(HEAD + b"Content-Length: 101\r\n\r\n") == NEED_MORE


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",  # both framings: smuggling
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: -5\r\n",
        b"Transfer-Encoding: gzip\r\n",
    ],
)
def test_ambiguous_framing_goes_to_the_parser_at_once(headers):
    assert RequestBuffer(1000).feed(HEAD + headers + b"\r\n") == MALFORMED


def test_bad_chunk_size_is_malformed():
    assert RequestBuffer(1000).feed(HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n") == MALFORMED
    assert RequestBuffer(1000).feed(HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabXX") == MALFORMED


def test_header_block_is_bounded():
    rb = RequestBuffer(1000)
    assert rb.feed(HEAD + b"X-Pad: " + b"a" * MAX_HEADER_BYTES) == HEADERS_TOO_LARGE


def test_expect_continue_is_answered_once_and_removed_for_the_parser():
    rb = RequestBuffer(1000)
    assert rb.feed(HEAD + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n") == NEED_MORE
    assert rb.needs_continue
    rb.continue_sent = True
    assert not rb.needs_continue
    assert rb.feed(b"abc") == COMPLETE
    assert rb.take() == HEAD + b"Content-Length: 3\r\n\r\nabc"


def test_pipelined_bytes_are_kept_for_the_parser():
    first = HEAD + b"Content-Length: 2\r\n\r\nok"
    second = b"GET /healthz HTTP/1.1\r\n"
    rb = RequestBuffer(1000)
    assert rb.feed(first + second) == COMPLETE
    assert rb.take() == first + second


def test_initial_bytes_count():
    rb = RequestBuffer(1000, initial=HEAD + b"\r\n")
    assert rb.status == COMPLETE
