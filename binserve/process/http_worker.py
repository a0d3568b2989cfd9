"""Gunicorn's gthread worker with request buffering in its event loop: a slow client never holds a thread.

design: gthread hands a connection to a request thread as soon as it has any data, and the thread
then blocks reading headers and body; 64 sockets that send half a request and stall take every
thread, and /healthz stops answering. This worker instead reads each request in the worker's
event loop (the thread that already accepts connections and waits on keep-alive sockets), without
blocking, into a buffer, and commits a thread only once the request is complete - headers, and a
body of known length or a chunked body up to its last chunk. `RequestBuffer` decides when a
request is complete; it does not parse HTTP beyond that (gunicorn's parser still does, from the
buffer). Stalled clients cost a socket and their buffered bytes, never a thread:

* a connection must deliver its whole header block within `client_timeout_s` of being accepted
  (or of its first byte after a keep-alive pause), and the body must keep arriving: a silence of
  `client_timeout_s` cuts it with 408;
* a body declared over `max_body_bytes` (`max_json_bytes` for JSON) - by Content-Length, or by
  chunk sizes adding up past it - is answered 413 without being read; header blocks over 64 KiB
  get 431;
* `Expect: 100-continue` is answered here, so the body arrives while the request is buffered;
* the memory one worker holds for requests is bounded (`max_inflight_bytes`): bytes being buffered,
  plus, for each request a thread runs, its body and what decoding may make of it
  (`INFLIGHT_WEIGHT` x the body). Past the bound, connections pause (stop being read, so TCP
  pushes back on their senders) until requests finish. Many large bodies sent at once are then
  run a few at a time instead of all at once, so they cannot add up past the container's memory
  limit; small requests weigh little and are not held back unless large ones fill the budget.

The buffered bytes go to gunicorn's parser through its unreader, exactly as if the thread had read
them. Plain HTTP only: TLS terminates at the proxy or load balancer in front (see README).
"""

from __future__ import annotations

import json
import selectors
import time
from collections import deque
from functools import partial

from gunicorn.workers.gthread import ThreadWorker

from binserve.config import INFLIGHT_WEIGHT, ServerConfig
from binserve.process import stamps
from binserve.wire.media import is_json, json_limit_hint

MAX_HEADER_BYTES = 64 * 1024
_MAX_CHUNK_LINE = 1024
_RECV_BYTES = 256 * 1024
_SCAN_INTERVAL_S = 0.25  # how often deadlines are checked (the event loop wakes at least every second)

NEED_MORE = "need_more"
COMPLETE = "complete"
BODY_TOO_LARGE = "body_too_large"
HEADERS_TOO_LARGE = "headers_too_large"
MALFORMED = "malformed"  # gunicorn's parser answers it (400), from what is buffered


#: bytes a request may still have to come and keep being read while the budget is full: small
#: requests are not held behind large uploads, and each can overshoot the budget by this much at most
_SMALL_REST = 64 << 10


class RequestBuffer:
    """Bytes of one HTTP/1.x request read so far, and whether the request is complete.

    `feed(data)` returns NEED_MORE, COMPLETE, BODY_TOO_LARGE, HEADERS_TOO_LARGE or MALFORMED.
    Scanning is incremental: each byte is looked at a bounded number of times.
    """

    def __init__(self, max_body_bytes: int, initial: bytes = b"", max_json_bytes: int | None = None) -> None:
        self.max_body = max_body_bytes
        self.max_json = max_json_bytes or max_body_bytes
        self.json = False  # a JSON body: held to max_json_bytes
        self.buf = bytearray(initial)
        self.body_start = -1  # index after the header block, once seen
        self.length: int | None = None  # Content-Length
        self.chunked = False
        self.expect_continue = False
        self.continue_sent = False
        self._header_scan = 0
        self._chunk_pos = 0  # next chunk-size line (chunked bodies)
        self._chunk_data_end = 0  # where the current chunk's data + CRLF end
        self._declared = 0  # chunk sizes so far
        self._in_trailer = False
        self.status = NEED_MORE
        if initial:
            self.status = self._scan()

    def feed(self, data: bytes) -> str:
        """Append `data` and say where the request stands."""
        self.buf += data
        self.status = self._scan()
        return self.status

    def remaining(self) -> int:
        """Bytes of the request still to come, as far as the headers say (unknown: very many)."""
        if self.body_start < 0 or self.length is None or self.chunked:
            return 1 << 62
        return max(0, self.body_start + self.length - len(self.buf))

    @property
    def needs_continue(self) -> bool:
        """True once headers asked for `100 Continue` and the body is still to come."""
        return self.expect_continue and not self.continue_sent and self.status == NEED_MORE

    def take(self) -> bytearray:
        """The buffered bytes for the parser; an Expect header answered here is taken out."""
        buf, self.buf = self.buf, bytearray()
        if self.continue_sent:
            head = bytes(buf[: self.body_start])
            lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"expect:")]
            buf[: self.body_start] = b"\r\n".join(lines)
        return buf

    # --- scanning --------------------------------------------------------------------------------
    def _scan(self) -> str:
        if self.body_start < 0:
            end = self.buf.find(b"\r\n\r\n", self._header_scan)
            if end < 0:
                self._header_scan = max(0, len(self.buf) - 3)
                return HEADERS_TOO_LARGE if len(self.buf) > MAX_HEADER_BYTES else NEED_MORE
            if end > MAX_HEADER_BYTES:
                return HEADERS_TOO_LARGE
            self.body_start = end + 4
            status = self._read_headers(bytes(self.buf[:end]))
            if status is not None:
                return status
            self._chunk_pos = self.body_start
        if self.chunked:
            return self._scan_chunks()
        if self.length is None:
            return COMPLETE
        return COMPLETE if len(self.buf) >= self.body_start + self.length else NEED_MORE

    def _read_headers(self, head: bytes) -> str | None:
        for line in head.split(b"\r\n")[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                continue  # obsolete folding or garbage: gunicorn's parser decides
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                if not value.isdigit() or (self.length is not None and self.length != int(value)):
                    return MALFORMED
                self.length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = value.rsplit(b",", 1)[-1].strip() == b"chunked"
                if not self.chunked:
                    return MALFORMED
            elif name == b"expect" and value == b"100-continue":
                self.expect_continue = True
            elif name == b"content-type":
                if is_json(value):
                    self.json = True
                    self.max_body = min(self.max_body, self.max_json)  # the app's limit for JSON
        if self.chunked and self.length is not None:
            return MALFORMED  # both framings at once: request smuggling territory, gunicorn refuses it
        if self.length is not None and self.length > self.max_body:
            return BODY_TOO_LARGE
        return None

    def _scan_chunks(self) -> str:
        buf = self.buf
        while True:
            if self._chunk_data_end:
                if len(buf) < self._chunk_data_end:
                    return NEED_MORE
                if buf[self._chunk_data_end - 2 : self._chunk_data_end] != b"\r\n":
                    return MALFORMED
                self._chunk_pos, self._chunk_data_end = self._chunk_data_end, 0
            pos = self._chunk_pos
            if self._in_trailer:
                if buf[pos : pos + 2] == b"\r\n":
                    return COMPLETE
                end = buf.find(b"\r\n\r\n", pos)
                if end >= 0:
                    return COMPLETE
                return MALFORMED if len(buf) - pos > MAX_HEADER_BYTES else NEED_MORE
            eol = buf.find(b"\r\n", pos, pos + _MAX_CHUNK_LINE)
            if eol < 0:
                return MALFORMED if len(buf) - pos >= _MAX_CHUNK_LINE else NEED_MORE
            size_field = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
            if not size_field or len(size_field) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_field):
                return MALFORMED
            size = int(size_field, 16)
            if size == 0:
                self._in_trailer = True
                self._chunk_pos = eol + 2
                continue
            self._declared += size
            if self._declared > self.max_body:
                return BODY_TOO_LARGE
            self._chunk_data_end = eol + 2 + size + 2


def _error_reply(status: int, reason: str, error_type: str, message: str) -> bytes:
    body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class BufferingWorker(ThreadWorker):
    """gthread, with every request read completely in the event loop before a thread runs it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = ServerConfig.from_env()
        self.client_timeout_s = config.client_timeout_s
        self.max_body_bytes = config.max_body_bytes
        self.max_json_bytes = config.max_json_bytes
        # bytes buffered in the event loop plus the weight of requests in threads; past it
        # connections pause (the config makes sure the largest request fits)
        self.max_inflight_bytes = config.max_inflight_bytes
        self._buffering: dict = {}  # conn -> (RequestBuffer, deadline)
        self._buffered = 0
        self._running = 0  # the weight of requests handed to threads that have not finished
        self._waiting: deque = deque()  # complete requests held back by the budget: (conn, buffer, weight)
        self._paused: deque = deque()
        self._exempt = None  # the one connection that may read past the budget (see _unstall)
        self._next_scan = 0.0

    @classmethod
    def check_config(cls, cfg, log) -> None:
        super().check_config(cfg, log)
        if cfg.is_ssl:
            raise RuntimeError("binserve's worker serves plain HTTP; terminate TLS in front of it")

    # --- event loop side ---------------------------------------------------------------------------
    def enqueue_req(self, conn) -> None:
        """Every route to a thread (new connection, keep-alive, pipelined) passes through the buffer."""
        if conn.__dict__.pop("binserve_ready", False):
            super().enqueue_req(conn)
            return
        initial = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.sock.setblocking(False)
        rb = RequestBuffer(self.max_body_bytes, initial, self.max_json_bytes)
        self._buffering[conn] = (rb, time.monotonic() + self.client_timeout_s)
        self._buffered += len(initial)
        if rb.status == NEED_MORE:
            # A keep-alive socket comes here because it is readable: read now, rather than register
            # it and wait for epoll to say so again (a round trip per request saved).
            try:
                data = conn.sock.recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data is not None:
                if not data:
                    self._drop(conn, registered=False)
                    return
                self._buffered += len(data)
                rb.feed(data)
        if not self._progress(conn, rb):
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn, sock) -> None:
        rb, deadline = self._buffering[conn]
        try:
            data = sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client closed (or reset) before its request was complete
            self._drop(conn, registered=True)
            return
        self._buffered += len(data)
        rb.feed(data)
        if rb.body_start >= 0:  # headers are in: from here on a stall of client_timeout_s is the limit
            deadline = time.monotonic() + self.client_timeout_s
        self._buffering[conn] = (rb, deadline)
        if self._progress(conn, rb, registered=True):
            return
        # a request with little left to come finishes arriving (at most _SMALL_REST more per connection)
        if self._over_budget() and conn is not self._exempt and rb.remaining() > _SMALL_REST:
            self.poller.unregister(sock)
            self._paused.append(conn)
            self._unstall()

    def _over_budget(self) -> bool:
        return self._buffered + self._running > self.max_inflight_bytes

    def _fits(self, weight: int) -> bool:
        """Whether a request of `weight` may run now: within the budget, or nothing else runs."""
        return not self._running or self._running + weight <= self.max_inflight_bytes

    def _progress(self, conn, rb: RequestBuffer, registered: bool = False) -> bool:
        """Act on the buffer's status; True when the connection left the event loop."""
        status = rb.status
        if status == NEED_MORE:
            if rb.needs_continue:
                rb.continue_sent = True
                self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
            return False
        if status == HEADERS_TOO_LARGE:
            self._reject(
                conn,
                _error_reply(
                    431,
                    "Request Header Fields Too Large",
                    "headers_too_large",
                    f"the request's header block is over {MAX_HEADER_BYTES} bytes",
                ),
                registered,
            )
            return True
        if status == BODY_TOO_LARGE and rb.chunked:
            # The app answers a Content-Length over the limit without reading it; a chunked body
            # declares its size chunk by chunk, so the event loop answers it once the sizes pass the limit.
            self._reject(
                conn,
                _error_reply(
                    413, "Content Too Large", "payload_too_large",
                    f"chunked {'JSON ' if rb.json else ''}body is over the {rb.max_body}-byte limit"
                    + (json_limit_hint(self.max_body_bytes) if rb.json else ""),
                ),  # fmt: skip
                registered,
            )
            return True
        # COMPLETE, MALFORMED (the parser answers 400) or a Content-Length over the limit (the app
        # answers 413 from the headers): a thread can run it without waiting on the client.
        if registered:
            self.poller.unregister(conn.sock)
        del self._buffering[conn]
        if conn is self._exempt:
            self._exempt = None
        conn.binserve_arrived = time.monotonic()
        weight = INFLIGHT_WEIGHT * len(rb.buf)
        # a small request that fits runs at once even while large ones wait: it would otherwise
        # queue for seconds behind uploads it does not compete with (seen: 128-text requests 504 behind
        # 64 MiB bodies); it holds little of the budget, so the large ones still run in arrival order
        small = weight <= self.max_inflight_bytes // 16
        if (self._waiting and not small) or not self._fits(weight):
            # complete, but running it now would pass the budget: it waits (its bytes stay counted,
            # so reading pauses) until running requests finish, in arrival order
            self._waiting.append((conn, rb, weight))
            return True
        self._dispatch(conn, rb, weight)
        return True

    def _dispatch(self, conn, rb: RequestBuffer, weight: int) -> None:
        """Hand a complete request to a thread; its weight counts until finish_request."""
        self._running += weight
        conn.binserve_weight = weight
        self._release(len(rb.buf))
        conn.binserve_prebuffer = rb.take()
        conn.binserve_ready = True
        conn.data_ready = True
        self.enqueue_req(conn)

    def _send(self, conn, data: bytes) -> None:
        try:
            conn.sock.send(data)
        except OSError:
            pass  # the deadline or the next read will find a broken connection

    def _reject(self, conn, reply: bytes, registered: bool) -> None:
        self._send(conn, reply)
        self._drop(conn, registered)

    def _drop(self, conn, registered: bool) -> None:
        if registered:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        rb, _ = self._buffering.pop(conn)
        if conn is self._exempt:
            self._exempt = None
        self._release(len(rb.buf))
        self.nr_conns -= 1
        conn.close()

    def finish_request(self, conn, fs) -> None:
        """A thread finished a request (called on the event loop): its weight leaves the budget."""
        self._running -= conn.__dict__.pop("binserve_weight", 0)
        while self._waiting and self._fits(self._waiting[0][2]):
            self._dispatch(*self._waiting.popleft())
        self._release(0)
        super().finish_request(conn, fs)

    def _release(self, nbytes: int) -> None:
        self._buffered -= nbytes
        while self._paused and not self._over_budget():
            self._resume(self._paused.popleft())
        self._unstall()

    def _resume(self, conn) -> None:
        if conn in self._buffering:
            rb, _ = self._buffering[conn]
            self._buffering[conn] = (rb, time.monotonic() + self.client_timeout_s)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _unstall(self) -> None:
        """Partial bodies alone can pass the budget (many large uploads at once): then every
        connection is paused, nothing is complete or running, and no bytes would ever be given back.
        The paused connection closest to complete reads on past the budget until its request is whole
        (at most one body more: max_inflight_bytes >= 5 x max_body_bytes), then runs and frees them."""
        if self._running or self._waiting or self._exempt is not None or not self._paused:
            return
        if any(c not in self._paused for c in self._buffering):
            return  # a connection still reading can complete and move things on
        conn = min(self._paused, key=lambda c: self._buffering[c][0].remaining() if c in self._buffering else 0)
        self._paused.remove(conn)
        self._exempt = conn
        self._resume(conn)

    def murder_pending(self) -> None:
        """Cut connections whose request stalled past client_timeout_s (408); idle ones at shutdown."""
        super().murder_pending()
        now = time.monotonic()
        if now < self._next_scan and self.alive:
            return
        self._next_scan = now + _SCAN_INTERVAL_S
        paused = set(self._paused)
        for conn, (rb, deadline) in list(self._buffering.items()):
            if conn in paused:
                continue
            if deadline <= now:
                reply = _error_reply(
                    408,
                    "Request Timeout",
                    "request_timeout",
                    f"the request did not arrive within client_timeout_s={self.client_timeout_s}",
                )
                self._reject(conn, reply, registered=True)
            elif not self.alive and not rb.buf:
                self._drop(conn, registered=True)  # shutting down: a connection that sent nothing can go

    # --- request thread side -----------------------------------------------------------------------
    def handle(self, conn):
        """Run a buffered request: the parser reads the buffer before it would touch the socket."""
        stamps.mark(conn.__dict__.pop("binserve_arrived", None))
        prebuffer = conn.__dict__.pop("binserve_prebuffer", None)
        if prebuffer is not None:
            conn.init()
            conn.parser.unreader.unread(prebuffer)
        return super().handle(conn)
