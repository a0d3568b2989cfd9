"""Hostile bodies: code execution attempts, forged dtypes, length bombs, memo and recursion abuse.

Every attempt to run code tries to create a sentinel file; each test asserts ProtocolError and
that the file does not exist. Bombs must fail fast and allocate no more than the body's size.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import re
import struct
import subprocess
import time
import tracemalloc

import numpy as np
import pytest

from binary_protocol import MAGIC, Limits, ProtocolError, binary_to_dict, dict_to_binary, json_to_dict


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a hostile payload ran code"


def refused(body, match: str | None = None, limits: Limits | None = None) -> ProtocolError:
    """Decode `body`; assert ProtocolError, fast, and with no allocation beyond the body's size.

    Only the decode call is measured (pytest's own matching happens after), with slack for
    tracemalloc's bookkeeping and the exception; the bombs here declare gigabytes.
    """
    gc.collect()
    error = None
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        binary_to_dict(body, limits) if limits else binary_to_dict(body)
    except ProtocolError as exc:
        error = exc
    finally:
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert error is not None, "the body was accepted"
    if match:
        assert re.search(match, str(error)), f"{match!r} not in {str(error)!r}"
    assert elapsed < 2.0, f"took {elapsed:.2f}s to refuse"
    assert peak <= len(body) + 128 * 1024, f"allocated {peak} bytes for a {len(body)}-byte body"
    return error


class Reduce:
    """An object whose pickle calls `func(*args)` on load - the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch_cmd(path) -> str:
    return f"touch {path}"


# --- code execution, through every route -------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    "make",
    [
        lambda p: Reduce(os.system, touch_cmd(p)),
        lambda p: Reduce(subprocess.call, ["touch", str(p)]),
        lambda p: Reduce(eval, f"open({str(p)!r}, 'w')"),
        lambda p: Reduce(exec, f"open({str(p)!r}, 'w')"),
        lambda p: Reduce(open, str(p), "w"),
    ],
    ids=["os.system", "subprocess.call", "eval", "exec", "open"],
)
def test_reduce_exploits_are_refused(sentinel, protocol, make):
    body = pickle.dumps({"x": make(sentinel)}, protocol=protocol)
    refused(body)


def test_refusal_names_the_global(sentinel):
    body = pickle.dumps({"x": Reduce(os.system, touch_cmd(sentinel))}, protocol=5)
    message = str(refused(body))
    assert "global 'posix.system' is not allowed" in message or "global 'os.system' is not allowed" in message


def _ops(*parts: bytes) -> bytes:
    return b"".join(parts)


def _su(s: str) -> bytes:  # SHORT_BINUNICODE
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


@pytest.mark.parametrize(
    "body,match",
    [
        # INST: protocol 0 instance creation with a module lookup
        (lambda p: _ops(b"(S'", touch_cmd(p).encode(), b"'\nios\nsystem\n."), "neither a binserve frame"),
        (
            lambda p: _ops(
                b"\x80\x02(X", struct.pack("<I", len(touch_cmd(p))), touch_cmd(p).encode(), b"ios\nsystem\n."
            ),
            "opcode INST is not allowed",
        ),
        # OBJ
        (
            lambda p: _ops(
                b"\x80\x02(cos\nsystem\nX", struct.pack("<I", len(touch_cmd(p))), touch_cmd(p).encode(), b"o."
            ),
            "global 'os.system' is not allowed",
        ),
        # NEWOBJ / NEWOBJ_EX with an allowed-looking class
        (
            lambda p: _ops(b"\x80\x04", _su("builtins"), _su("object"), b"\x93)\x81."),
            "global 'builtins.object' is not allowed",
        ),
        (lambda p: _ops(b"\x80\x04", _su("numpy"), _su("ndarray"), b")}\x92."), "opcode NEWOBJ_EX is not allowed"),
        (lambda p: _ops(b"\x80\x04", _su("numpy"), _su("ndarray"), b")\x81."), "opcode NEWOBJ is not allowed"),
        # EXT1/2/4: the copyreg extension registry
        (lambda p: b"\x80\x02\x82\x01.", "opcode EXT1 is not allowed"),
        (lambda p: b"\x80\x02\x83\x01\x00.", "opcode EXT2 is not allowed"),
        (lambda p: b"\x80\x02\x84\x01\x00\x00\x00.", "opcode EXT4 is not allowed"),
        # PERSID / BINPERSID: persistent_load hooks
        (lambda p: b"\x80\x02P1\n.", "opcode PERSID is not allowed"),
        (lambda p: _ops(b"\x80\x04", _su("x"), b"Q."), "opcode BINPERSID is not allowed"),
        # dotted names reaching through an allowed module
        (
            lambda p: _ops(b"\x80\x04", _su("numpy"), _su("testing.os.system"), b"\x93."),
            "global 'numpy.testing.os.system' is not allowed",
        ),
        (lambda p: b"\x80\x02cnumpy\ndtype.__class__\n.", "global 'numpy.dtype.__class__' is not allowed"),
        (lambda p: _ops(b"\x80\x04", _su("builtins"), _su("getattr"), b"\x93."), "global 'builtins.getattr'"),
        (lambda p: _ops(b"\x80\x04", _su("builtins"), _su("__import__"), b"\x93."), "builtins.__import__"),
        # BUILD on something that is not a pending numpy object
        (lambda p: b"\x80\x02}}b.", "BUILD on a dict is not allowed"),
        (lambda p: _ops(b"\x80\x04", _su("numpy"), _su("ndarray"), b"\x93}b."), "BUILD on a Global"),
        # an allowed global called with something other than numpy's own arguments
        (
            lambda p: _ops(b"\x80\x04", _su("_codecs"), _su("encode"), b"\x93", _su("x"), _su("rot13"), b"\x86R."),
            "only as \\(str, 'latin1'\\)",
        ),
        (
            lambda p: _ops(
                b"\x80\x04",
                _su("numpy._core.multiarray"),
                _su("_reconstruct"),
                b"\x93",
                _su("numpy"),
                _su("dtype"),
                b"\x93K\x00\x85C\x01b\x87R.",
            ),
            "_reconstruct is allowed only",
        ),
        # a global used as a value instead of being called
        (
            lambda p: _ops(b"\x80\x04}", _su("k"), _su("numpy"), _su("ndarray"), b"\x93s."),
            "global 'numpy.ndarray' used as a value",
        ),
        # protocol 0/1 text opcodes and sets are not needed by any client
        (lambda p: b"(lp0\n.", "neither a binserve frame"),
        (lambda p: b"\x80\x04\x8f.", "opcode EMPTY_SET is not allowed"),
        (lambda p: b"\x80\x01.", "pickle protocol 1 is not supported"),
    ],
)
def test_opcode_routes_are_refused(sentinel, body, match):
    refused(body(sentinel), match)


def test_object_arrays_are_refused(sentinel):
    arr = np.array([Reduce(os.system, touch_cmd(sentinel))], dtype=object)
    for protocol in (2, 3, 4, 5):
        refused(pickle.dumps({"x": arr}, protocol=protocol))


def test_object_dtype_is_refused():
    refused(pickle.dumps({"x": np.dtype(object)}, protocol=5), "dtype 'O8' of 'x' is not allowed")


def test_numeric_dtype_as_a_value_is_refused():
    refused(pickle.dumps({"x": np.dtype("f4")}, protocol=5), "dtype is not a supported value")


# --- forged dtypes, shapes and lengths ----------------------------------------------------------


def _inline(obj) -> bytes:
    """The opcodes that push `obj`, without PROTO/STOP and without memo ops."""
    out = io.BytesIO()
    p = pickle.Pickler(out, protocol=2)
    p.fast = True  # no memo, so the ops can be spliced into another pickle
    p.dump(obj)
    return out.getvalue()[2:-1]


def frombuffer_pickle(buf: bytes, code: str, state, shape, order="C", key="image") -> bytes:
    """A protocol 4 pickle of {key: _frombuffer(buf, dtype(code)+BUILD(state), shape, order)}."""
    return _ops(
        b"\x80\x04}",
        _su(key),
        _su("numpy._core.numeric"),
        _su("_frombuffer"),
        b"\x93(",
        b"C" + bytes([len(buf)]) + buf if len(buf) < 256 else b"B" + struct.pack("<I", len(buf)) + buf,
        _su("numpy"),
        _su("dtype"),
        b"\x93",
        _su(code),
        b"\x89\x88\x87R",
        _inline(state),
        b"b",
        _inline(shape),
        _su(order),
        b"tRs.",
    )


CANONICAL_F4 = (3, "<", None, None, None, -1, -1, 0)


def test_forged_pickle_helper_is_valid():
    out = binary_to_dict(frombuffer_pickle(b"\0" * 8, "f4", CANONICAL_F4, (2,)))
    assert out["image"].dtype == np.float32 and out["image"].shape == (2,)


@pytest.mark.parametrize("code", ["O", "O8", "V8", "M8", "m8", "U1", "S1", "f16", "c32", "i", "f4,f4", "<f4"])
def test_non_numeric_dtype_codes_are_refused(code):
    refused(frombuffer_pickle(b"\0" * 8, code, CANONICAL_F4, (2,)), "dtype 'image'|dtype .* is not allowed")


@pytest.mark.parametrize(
    "state",
    [
        (3, "<", ("a",), {"a": ("f4", 0)}, None, -1, -1, 0),  # structured fields
        (3, "<", None, None, ("f4", (2,)), -1, -1, 0),  # subarray
        (3, "<", None, None, None, 8, 1, 0),  # forged itemsize/alignment
        (3, "<", None, None, None, -1, -1, 63),  # forged flags (NPY_ITEM_HASOBJECT...)
        (3, "=", None, None, None, -1, -1, 0),
        (4, "<", None, None, None, -1, -1, 0, {"m": 1}),  # metadata
        "not a tuple",
    ],
)
def test_non_canonical_dtype_state_is_refused(state):
    refused(frombuffer_pickle(b"\0" * 8, "f4", state, (2,)), "non-canonical state|invalid|expects")


def test_length_mismatch_names_the_array():
    err = refused(frombuffer_pickle(b"\0" * 12, "u1", (3, "|", None, None, None, -1, -1, 0), (480, 640, 3)))
    assert "array 'image' declares 921600 bytes, 12 present" in str(err)


@pytest.mark.parametrize("shape", [(-1,), (2.0,), ("2",), (True, 2), tuple([1] * 40), [2]])
def test_invalid_shapes_are_refused(shape):
    refused(frombuffer_pickle(b"\0" * 8, "f4", CANONICAL_F4, shape), "invalid shape|declares")


def test_overflowing_shape_is_refused_before_allocation():
    refused(frombuffer_pickle(b"\0" * 8, "f4", CANONICAL_F4, (2**40, 2**40)), "over the .*-byte limit")


def test_invalid_order_is_refused():
    refused(frombuffer_pickle(b"\0" * 8, "f4", CANONICAL_F4, (2,), order="K"), "invalid order")


# --- declared-length bombs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"\x80\x05\x8e" + struct.pack("<Q", 2**62) + b"xx.",  # BINBYTES8
        b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"xx.",  # BYTEARRAY8
        b"\x80\x05\x8d" + struct.pack("<Q", 2**40) + b"xx.",  # BINUNICODE8
        b"\x80\x05X" + struct.pack("<I", 2**31) + b"xx.",  # BINUNICODE
        b"\x80\x05B" + struct.pack("<I", 2**31) + b"xx.",  # BINBYTES
        b"\x80\x05\x8b" + struct.pack("<i", 2**30) + b"xx.",  # LONG4
        b"\x80\x05\x95" + struct.pack("<Q", 2**50) + b"}.",  # FRAME
        b"\x80\x05\x8c\xffab.",  # SHORT_BINUNICODE
        b"\x80\x05C\xffab.",  # SHORT_BINBYTES
    ],
    ids=[
        "BINBYTES8",
        "BYTEARRAY8",
        "BINUNICODE8",
        "BINUNICODE",
        "BINBYTES",
        "LONG4",
        "FRAME",
        "SHORT_BINUNICODE",
        "SHORT_BINBYTES",
    ],
)
def test_declared_length_bombs(body):
    refused(body, "declares|over the|truncated|at most")


def frame(pickle_bytes: bytes, table: list[tuple[int, int]], tail: bytes = b"", n_buf=None) -> bytes:
    n = len(table) if n_buf is None else n_buf
    head = struct.pack("<4sBBHIIQ", MAGIC, 1, 0, 0, n, 0, len(pickle_bytes))
    return head + b"".join(struct.pack("<QQ", *e) for e in table) + pickle_bytes + tail


@pytest.mark.parametrize(
    "body,match",
    [
        (frame(b"\x80\x05}.", [], n_buf=2**31), "declares .* buffers"),
        (frame(b"\x80\x05}.", [], n_buf=1000), "buffer table declares"),
        (struct.pack("<4sBBHIIQ", MAGIC, 1, 0, 0, 0, 0, 2**60) + b"\x80\x05}.", "frame pickle declares"),
        (frame(b"\x80\x05}.", [(64, 2**40)]), "over the .*-byte limit|declares"),
        (frame(b"\x80\x05}.", [(64, 1000)]), "declares 1000 bytes at offset 64"),
        (frame(b"\x80\x05}.", [(33, 0)]), "not 64-aligned"),
        (frame(b"\x80\x05}.", []) + b"x", "trailing bytes"),
        (struct.pack("<4sBBHIIQ", MAGIC, 2, 0, 0, 0, 0, 0), "version 2"),
        (MAGIC + b"\x01", "header needs 24 bytes"),
    ],
)
def test_frame_bombs_and_lies(body, match):
    refused(body, match)


def test_unused_or_missing_buffers_are_refused():
    body = dict_to_binary({"x": np.arange(4)})
    good = binary_to_dict(body)
    assert good["x"].tolist() == [0, 1, 2, 3]
    # claim one buffer more than the pickle uses: the frame must account for every byte
    n = struct.unpack_from("<I", body, 8)[0]
    head = struct.pack("<4sBBHIIQ", MAGIC, 1, 0, 0, n + 1, 0, struct.unpack_from("<Q", body, 16)[0])
    refused(head + body[24:], None)
    # a pickle that asks for a buffer the frame does not have
    refused(frame(b"\x80\x05}" + _su("k") + b"\x97s.", []), "NEXT_BUFFER asks for buffer 0")


# --- memo abuse and recursion bombs ---------------------------------------------------------------


def test_memo_get_of_unset_key():
    refused(b"\x80\x05}h\x07.", "memo key 7 was never stored")


def test_alias_bomb_is_counted_on_every_visit():
    # l0 = [0]; l_{k+1} = [l_k, l_k]: 60 levels is 2**60 visits from a few hundred bytes
    ops = [b"\x80\x05](K\x00e\x94"]
    for k in range(60):
        ops.append(b"](j" + struct.pack("<I", k) + b"j" + struct.pack("<I", k) + b"e\x94")
    body = b"".join(ops) + b"0}" + _su("k") + b"j" + struct.pack("<I", 60) + b"s."
    refused(body, "nesting deeper|more than .* items|decodes into more than", limits=Limits(max_depth=100))


def test_a_repeated_container_is_charged_on_every_reference():
    """One 256 KiB string inside a list referenced 256 times (pickle memoizes the list): a ~256 KB
    body whose texts are 64 MiB once the server copies them out. The repeat is charged per
    reference, so it is over the budget (16 MiB + 4 x the body); 16 references fit."""
    inner = ["x" * (256 * 1024)]
    body = dict_to_binary({"texts": [inner] * 256})
    assert len(body) < 300 * 1024
    refused(body, "decodes into more than")
    assert len(binary_to_dict(dict_to_binary({"texts": [inner] * 16}))["texts"]) == 16


def test_recursion_bomb_lists():
    body = b"\x80\x05" + b"]" * 200_000 + b"a" * 199_999 + b"0}."
    refused(body, "more than 4096 items on the stack")


def test_recursion_bomb_lists_nested_as_they_come():
    body = b"\x80\x05]" + b"]\x94a0h\x00" * 1 + b"".join(b"]" for _ in range(40)) + b"a" * 40 + b"0}."
    refused(body, "nesting deeper than 32")


def test_recursion_bomb_tuples():
    body = b"\x80\x05N" + b"\x85" * 200_000 + b"0}."
    refused(body, "nesting deeper than 32")


def test_recursion_bomb_dicts():
    body = b"\x80\x05" + (b"}" + _su("k")) * 50_000 + b"s" * 49_999 + b"."
    refused(body, "more than 4096 items on the stack")
    body = b"\x80\x05" + (b"}" + _su("k")) * 40 + b"}" + b"s" * 40 + b"."
    refused(body, "nesting deeper than 32")


def test_container_mutated_after_placement_is_refused():
    # a = []; b = [a]; then append to a through the memo: depth accounting must not go stale
    body = b"\x80\x05]\x94]h\x00ah\x00N\x85a0}."
    refused(body, "modified after it was placed")


def test_self_containing_list_is_refused():
    refused(b"\x80\x05]\x94h\x00a0}.", "may not contain itself")


def test_many_items_are_refused():
    body = b"\x80\x05}" + _su("k") + b"](" + b"N" * 2000 + b"es."
    refused(body, "more than 1000 items", limits=Limits(max_items=1000))
    body = b"\x80\x05}" + _su("k") + b"]" + b"(" + b"N" * 1000 + b"e" + b"(" + b"N" * 1000 + b"es."
    refused(body, "more than 1500 items", limits=Limits(max_items=1500))


# --- truncated, trailing and non-dict bodies -------------------------------------------------------


def test_every_truncation_is_refused():
    for body in (
        dict_to_binary({"a": np.arange(5), "t": ["hi"], "n": [[1, 2], [3]]}),
        pickle.dumps({"a": np.arange(5), "t": ["hi"], "n": [[1, 2], [3]]}, protocol=5),
        pickle.dumps({"a": np.arange(5), "t": ["hi"]}, protocol=2),
    ):
        for cut in range(len(body)):
            with pytest.raises(ProtocolError):
                binary_to_dict(body[:cut])


def test_trailing_bytes_are_refused():
    refused(pickle.dumps({"a": 1}, protocol=5) + b"\x00", "trailing bytes")


@pytest.mark.parametrize("value", [[1, 2], 3, "x", None, {1: "int key"}, {("t",): 1}])
def test_top_level_must_be_str_keyed_dict(value):
    refused(pickle.dumps(value, protocol=5), "top-level value must be a dict|keys must be str")


def test_garbage_is_refused():
    refused(b"GET / HTTP/1.1\r\n", "neither a binserve frame")
    refused(b"", "neither a binserve frame")


def test_body_limit():
    refused(pickle.dumps({"a": b"x" * 5000}, protocol=5), "over the 1000-byte limit", Limits(max_body_bytes=1000))


def test_json_bombs():
    with pytest.raises(ProtocolError, match="too deep|nesting deeper"):
        json_to_dict(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(ProtocolError, match="nesting deeper than 32"):
        json_to_dict(b'{"a":' + b"[" * 40 + b"]" * 40 + b"}")
    with pytest.raises(ProtocolError, match="must be an object"):
        json_to_dict(b"[1]")
    with pytest.raises(ProtocolError, match="invalid JSON"):
        json_to_dict(b'{"a": ')
