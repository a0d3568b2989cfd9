"""The binserve wire format: a framed pickle 5 with out-of-band array buffers, plain pickle, JSON.

design: the structure of a request (a dict of arrays, token lists, texts, scalars) travels as a
pickle protocol 5 stream; the bytes of every numpy array travel beside it as out-of-band buffers,
64-byte aligned, so the decoder hands back arrays that are views of the body (no copy) and the
encoder copies each array's bytes exactly once, into the output. Decoding never calls
`pickle.loads`: `binserve.wire.safe_pickle.safe_loads` runs an allow-listed pickle VM with argument checks.
Plain `pickle.dumps(d, protocol=5)` bodies (protocols 2-5) from existing clients decode through
the same VM; JSON is there for curl.

Frame layout (all integers little-endian; offsets count from the first byte of the frame):

    offset      size    field
    0           4       magic b"\\x89BSV"
    4           1       version, 1
    5           1       flags, 0 (reserved)
    6           2       reserved, 0
    8           4       n_buffers: number of out-of-band buffers
    12          4       reserved, 0
    16          8       pickle_length
    24          16*n    buffer table: n pairs (u64 offset, u64 length); each offset a multiple of 64,
                        not before the end of the previous buffer (or of the pickle)
    24+16n      pickle_length   a pickle (protocol 5) whose NEXT_BUFFER opcodes take the buffers
                        in table order; each must be used exactly once
    ...                 zero padding up to each buffer's offset, then the buffer's bytes
    end                 the frame ends where its last buffer (or, with none, the pickle) ends

A writer in any language emits the pickle a Python `pickle.Pickler(protocol=5, buffer_callback=...)`
would for the dict, with arrays reduced as numpy does: `numpy._core.numeric._frombuffer(
NEXT_BUFFER, numpy.dtype(code, False, True) + BUILD(state), shape, order)`.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import pickle
import re
import struct
import threading
from itertools import repeat

import numpy as np

from binserve.errors import InvalidInput, LimitExceeded, ProtocolError, UnsupportedMediaType
from binserve.wire.media import is_json, media_type
from binserve.wire.safe_pickle import DEFAULT_LIMITS, DTYPE_CODES, Limits, safe_loads

__all__ = [
    "DEFAULT_LIMITS",
    "FRAMED",
    "IMAGE_MEDIA_TYPES",
    "JSON",
    "PICKLE",
    "Limits",
    "ProtocolError",
    "as_array",
    "binary_to_dict",
    "decode_body",
    "dict_to_binary",
    "dict_to_json",
    "encode_body",
    "json_to_dict",
    "reply_format",
]

MAGIC = b"\x89BSV"
VERSION = 1
ALIGN = 64
_HEADER = struct.Struct("<4sBBHIIQ")

# The formats a body can be in, and their media types.
FRAMED = "binserve"
PICKLE = "pickle"
JSON = "json"
#: a body that is one encoded image, for models that take `images`
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp")
MEDIA_TYPES = {
    FRAMED: "application/x-binserve",
    PICKLE: "application/octet-stream",
    JSON: "application/json",
}
_BINARY_MEDIA = frozenset(
    {"application/x-binserve", "application/octet-stream", "application/x-pickle", "application/python-pickle"}
)


def _check_array(arr: np.ndarray, where: str) -> np.ndarray:
    code = f"{arr.dtype.kind}{arr.dtype.itemsize}"
    if code not in DTYPE_CODES:
        raise ProtocolError(
            f"{where} has dtype {arr.dtype}; only bool, int, uint, float16/32/64 and complex64/128 travel"
        )
    return arr


class _Pickler(pickle.Pickler):
    """Pickles arrays as numpy does for protocol 5, after making them sendable (plain, contiguous)."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            arr = _check_array(obj, "an array")
            if type(arr) is not np.ndarray:
                arr = np.asarray(arr)  # subclasses (np.matrix, ...) travel as plain arrays
            if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
                # numpy would pickle a strided view in-band; one extra copy keeps it out-of-band.
                arr = np.ascontiguousarray(arr)
            return arr.__reduce_ex__(5)
        if isinstance(obj, np.generic):
            _check_array(np.asarray(obj), "a numpy scalar")
        return NotImplemented


def _check_top(data) -> None:
    if not isinstance(data, dict):
        raise TypeError(f"the payload must be a dict with str keys, got {type(data).__name__}")
    for k in data:
        if not isinstance(k, str):
            raise TypeError(f"payload keys must be str, got {k!r}")


def dict_to_binary(data: dict) -> bytes:
    """Encode `data` as a binserve frame; each array's bytes are copied once, into the result."""
    _check_top(data)
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffers.append).dump(data)
    pkl = out.getbuffer()
    raws = [b.raw() for b in buffers]
    table_end = _HEADER.size + 16 * len(raws)
    pos = table_end + len(pkl)
    table = []
    parts: list = [None, pkl]
    for raw in raws:
        pad = -pos % ALIGN
        if pad:
            parts.append(b"\0" * pad)
        pos += pad
        table.append((pos, raw.nbytes))
        parts.append(raw)
        pos += raw.nbytes
    header = _HEADER.pack(MAGIC, VERSION, 0, 0, len(raws), 0, len(pkl))
    parts[0] = header + struct.pack(f"<{2 * len(table)}Q", *(x for pair in table for x in pair))
    try:
        return b"".join(parts)
    finally:
        pkl.release()


def _decode_frame(mv: memoryview, limits: Limits) -> dict:
    size = len(mv)
    if size < _HEADER.size:
        raise ProtocolError(f"frame header needs {_HEADER.size} bytes, {size} present")
    _, version, flags, res1, n_buf, res2, pickle_len = _HEADER.unpack_from(mv)
    if version != VERSION:
        raise ProtocolError(f"frame version {version} is not supported (this server speaks {VERSION})")
    if flags or res1 or res2:
        raise ProtocolError("frame reserved fields must be 0")
    if n_buf > limits.max_buffers:
        raise LimitExceeded(f"frame declares {n_buf} buffers, more than the limit of {limits.max_buffers}")
    table_end = _HEADER.size + 16 * n_buf
    if table_end > size:
        raise ProtocolError(f"frame buffer table declares {16 * n_buf} bytes, {size - _HEADER.size} present")
    pickle_end = table_end + pickle_len
    if pickle_end > size:
        raise ProtocolError(f"frame pickle declares {pickle_len} bytes, {size - table_end} present")
    table = struct.unpack_from(f"<{2 * n_buf}Q", mv, _HEADER.size)
    buffers = []
    prev_end = pickle_end
    for i in range(n_buf):
        off, length = table[2 * i], table[2 * i + 1]
        if off % ALIGN or off < prev_end:
            raise ProtocolError(f"buffer {i} offset {off} is not {ALIGN}-aligned after byte {prev_end}")
        if length > limits.max_array_bytes:
            raise LimitExceeded(f"buffer {i} of {length} bytes is over the {limits.max_array_bytes}-byte limit")
        if off + length > size:
            raise ProtocolError(f"buffer {i} declares {length} bytes at offset {off}, the frame has {size}")
        buffers.append(mv[off : off + length])
        prev_end = off + length
    if prev_end != size:
        raise ProtocolError(f"{size - prev_end} trailing bytes after the frame's last buffer")
    return safe_loads(mv, start=table_end, end=pickle_end, buffers=buffers, limits=limits)


def binary_to_dict(body, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Decode a binserve frame or a plain pickle (protocols 2-5) safely; arrays are views of `body`."""
    mv = memoryview(body).cast("B")
    if len(mv) > limits.max_body_bytes:
        raise LimitExceeded(f"body of {len(mv)} bytes is over the {limits.max_body_bytes}-byte limit")
    if mv[:4] == MAGIC:
        return _decode_frame(mv, limits)
    if len(mv) and mv[0] == 0x80:
        return safe_loads(mv, limits=limits)
    raise ProtocolError("body is neither a binserve frame (magic \\x89BSV) nor a pickle (starts with 0x80)")


# --- JSON ---------------------------------------------------------------------------------


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = True


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic GC (process-wide) while a JSON body is parsed: `json.loads` of a body of
    many small lists triggers a collection every few hundred allocations, which made a 4 MB body
    of `[],` take 1.4 s instead of 0.1 s, holding the GIL throughout. Counted, so concurrent
    parses keep it paused until the last one ends."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


# A lone surrogate can only come from a \\uD800-\\uDFFF escape or from UTF-8-encoded surrogate
# bytes (json.loads decodes with surrogatepass); bodies without either skip the string checks.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _check_json_str(s: str, key) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            where = f" in {key!r}" if key is not None else ""
            raise ProtocolError(f"a string{where} is not valid UTF-8 (a lone surrogate)") from None


def _check_json_tree(root: dict, limits: Limits, strings: bool) -> None:
    """Depth, item and string limits (and, when `strings`, strict strings) for a parsed JSON body.

    One pass over the containers; scalars cost a type check each (a 4 MiB body can hold a
    million of them).
    """
    max_depth, max_str = limits.max_depth, limits.max_str_bytes
    items = 0
    todo = [(root, 1, None)]
    while todo:
        obj, depth, key = todo.pop()
        if depth > max_depth:
            raise ProtocolError(f"nesting deeper than {max_depth} levels")
        items += len(obj)
        if items > limits.max_items:
            raise LimitExceeded(f"more than {limits.max_items} items")
        is_dict = type(obj) is dict
        for k, v in obj.items() if is_dict else zip(repeat(key), obj):
            t = type(v)
            if t is list or t is dict:
                if v:
                    todo.append((v, depth + 1, k))
                elif depth + 1 > max_depth:
                    raise ProtocolError(f"nesting deeper than {max_depth} levels")
            elif t is str:
                if len(v) > max_str:
                    raise LimitExceeded(f"string of {len(v)} characters in {k!r} is over the {max_str} limit")
                if strings:
                    _check_json_str(v, k)
            if strings and is_dict:
                _check_json_str(k, None)


def json_to_dict(body, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Parse a JSON body into a dict, within `limits`; arrays stay lists until `as_array`.

    JSON has its own size limit, checked before parsing: `json.loads` builds every object before
    anything can be counted, and one byte of JSON can become ~25 bytes of Python objects.
    """
    if len(body) > limits.max_json_bytes:
        raise LimitExceeded(
            f"JSON body of {len(body)} bytes is over the {limits.max_json_bytes}-byte limit for JSON; "
            "send larger payloads in the binary format (request_tools does)"
        )
    with _gc_paused():
        try:
            data = json.loads(bytes(body))
        except RecursionError:
            raise ProtocolError("JSON nesting is too deep") from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise ProtocolError(f"invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ProtocolError(f"the top-level JSON value must be an object, got {type(data).__name__}")
        _check_json_tree(data, limits, strings=_MAYBE_SURROGATE.search(body) is not None)
    return data


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dict_to_json(data: dict) -> bytes:
    """Encode a reply as JSON: arrays become nested lists, numpy scalars plain numbers."""
    return json.dumps(data, default=_json_default, separators=(",", ":")).encode()


def as_array(value, *, dtype, name: str) -> np.ndarray:
    """`value` (an array, or nested lists from JSON) as an ndarray of `dtype`; 400 naming `name` if not.

    Allowed conversions: any safe cast, float to a narrower float, bool/int to float, and int to
    another int width when every value fits. Anything else (float to int, out-of-range ints, text,
    ragged lists) is refused rather than silently truncated.
    """
    dtype = np.dtype(dtype)
    if not isinstance(value, np.ndarray):
        if not isinstance(value, (list, tuple, int, float, bool)):
            raise InvalidInput(f"{name!r} is a {type(value).__name__}; expected a {dtype} array")
        try:
            value = np.asarray(value)
        except ValueError:
            raise InvalidInput(f"{name!r} is a ragged nested list; expected a {dtype} array") from None
        if value.size == 0:
            return value.astype(dtype)  # an empty list carries no dtype of its own
        if value.dtype.kind not in "biuf":
            raise InvalidInput(f"{name!r} holds non-numeric values; expected a {dtype} array")
    if value.dtype == dtype:
        return value
    src, dst = value.dtype.kind, dtype.kind
    if np.can_cast(value.dtype, dtype, "safe") or (src in "biuf" and dst == "f"):
        return value.astype(dtype)
    if src in "iu" and dst in "iu":
        info = np.iinfo(dtype)
        if value.size and (value.min() < info.min or value.max() > info.max):
            raise InvalidInput(f"{name!r} has values outside the range of {dtype}")
        return value.astype(dtype)
    raise InvalidInput(f"{name!r} has dtype {value.dtype}, expected {dtype}")


# --- choosing the format of a request and of its reply --------------------------------------


def decode_body(body, content_type: str | None, limits: Limits = DEFAULT_LIMITS) -> tuple[dict, str]:
    """Decode a request body; returns (payload, format). 415 for an unknown Content-Type.

    A raw image body (`image/jpeg`, `image/png`, `image/webp`: curl's `--data-binary @cat.jpg`) is
    the request `{"images": <its bytes>}`, answered in JSON (an image is no reply format)."""
    media = media_type(content_type)
    if is_json(media):
        return json_to_dict(body, limits), JSON
    if media in IMAGE_MEDIA_TYPES:
        return {"images": bytes(body)}, JSON
    if media in _BINARY_MEDIA or media == "":
        head = bytes(body[:4])
        if head == MAGIC:
            return binary_to_dict(body, limits), FRAMED
        if head[:1] == b"\x80":
            return binary_to_dict(body, limits), PICKLE
        if media == "" and head.lstrip()[:1] == b"{":
            return json_to_dict(body, limits), JSON
        return binary_to_dict(body, limits), FRAMED  # raises a ProtocolError that says what it saw
    raise UnsupportedMediaType(
        f"Content-Type {media!r} is not supported; send application/x-binserve, "
        "application/octet-stream (pickle), application/json, or an image as image/jpeg, image/png or image/webp"
    )


def reply_format(request_format: str, accept: str | None) -> str:
    """The reply's format: the first of ours that `Accept` names, else the request's own."""
    for part in (accept or "").split(","):
        media = media_type(part)
        for fmt, mt in MEDIA_TYPES.items():
            if media == mt:
                return fmt
    return request_format


def encode_body(data: dict, fmt: str) -> tuple[bytes, str]:
    """Encode a reply in `fmt`; returns (body, Content-Type)."""
    if fmt == FRAMED:
        return dict_to_binary(data), MEDIA_TYPES[FRAMED]
    if fmt == PICKLE:
        return pickle.dumps(data, protocol=5), MEDIA_TYPES[PICKLE]
    return dict_to_json(data), MEDIA_TYPES[JSON]
