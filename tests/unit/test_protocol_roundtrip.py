"""Round trips of every supported value through the framed format, plain pickle (2-5) and JSON."""

from __future__ import annotations

import math
import pickle

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from binary_protocol import (
    FRAMED,
    JSON,
    PICKLE,
    as_array,
    binary_to_dict,
    decode_body,
    dict_to_binary,
    dict_to_json,
    encode_body,
    json_to_dict,
    reply_format,
)
from binserve.errors import InvalidInput, UnsupportedMediaType

DTYPES = ["b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]


def same(a, b) -> bool:
    """Deep equality where NaN equals NaN and arrays compare by dtype, shape and values."""
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        )
    if isinstance(a, np.generic):
        return type(a) is type(b) and (a == b or (np.isnan(a) and np.isnan(b)))
    if isinstance(a, float):
        return type(b) is float and (a == b or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@st.composite
def arrays(draw):
    code = draw(st.sampled_from(DTYPES))
    dtype = np.dtype(code)
    if dtype.itemsize > 1 and draw(st.booleans()):
        dtype = dtype.newbyteorder(">")
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    arr = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["c", "f", "strided"]))
    if layout == "f":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim:
        arr = np.concatenate([arr, arr], axis=0)[::2]  # a non-contiguous view with the same values
    return arr


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.sampled_from([np.float32(1.5), np.int64(-3), np.bool_(True), np.float64("nan"), np.uint8(255)]),
)
token_ids = st.lists(st.lists(st.integers(0, 30521), max_size=12), max_size=5)
leaves = st.one_of(scalars, arrays(), token_ids)
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(max_size=12), values, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_framed_round_trip(payload):
    assert same(payload, binary_to_dict(dict_to_binary(payload)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, st.integers(min_value=2, max_value=5))
def test_plain_pickle_round_trip(payload, protocol):
    assert same(payload, binary_to_dict(pickle.dumps(payload, protocol=protocol)))


def test_framed_arrays_are_views_of_the_body():
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    body = dict_to_binary({"image": image, "state": np.ones(6, np.float32)})
    out = binary_to_dict(body)
    whole = np.frombuffer(body, np.uint8)
    assert np.shares_memory(out["image"], whole)
    assert np.shares_memory(out["state"], whole)
    assert np.array_equal(out["image"], image)
    # the body is immutable, and so are the views
    assert not out["image"].flags.writeable


def test_framed_buffers_are_aligned_in_the_frame():
    body = dict_to_binary({"a": np.arange(3, dtype=np.int8), "b": np.arange(5, dtype=np.float64)})
    out = binary_to_dict(body)
    base = np.frombuffer(body, np.uint8).ctypes.data
    for arr in out.values():
        assert (arr.ctypes.data - base) % 64 == 0


@pytest.mark.parametrize("protocol", [4, 5])
def test_plain_pickle_arrays_are_views_of_the_body(protocol):
    arr = np.arange(1000, dtype=np.float32)
    body = pickle.dumps({"x": arr}, protocol=protocol)
    out = binary_to_dict(body)
    assert np.shares_memory(out["x"], np.frombuffer(body, np.uint8))
    assert np.array_equal(out["x"], arr)


def test_encoder_copies_array_data_once():
    """The only copy of a contiguous array's bytes is the one in the output frame."""
    arr = np.arange(1 << 20, dtype=np.float32)
    body = dict_to_binary({"x": arr})
    assert len(body) < arr.nbytes + 1024
    assert np.array_equal(binary_to_dict(body)["x"], arr)


def test_encoder_refuses_object_arrays():
    with pytest.raises(ValueError, match="dtype object"):
        dict_to_binary({"x": np.array([object()], dtype=object)})


def test_encoder_refuses_non_dict_payload():
    with pytest.raises(TypeError, match="dict"):
        dict_to_binary([1, 2])  # type: ignore[arg-type]


def test_json_round_trip_and_arrays():
    body = dict_to_json({"embeddings": np.ones((2, 3), np.float32), "n": np.int64(4), "t": ["a"]})
    assert json_to_dict(body) == {"embeddings": [[1.0] * 3] * 2, "n": 4, "t": ["a"]}


def test_decode_body_detects_formats():
    d = {"x": np.arange(3)}
    assert decode_body(dict_to_binary(d), "application/x-binserve")[1] == FRAMED
    assert decode_body(pickle.dumps(d, protocol=5), "application/octet-stream")[1] == PICKLE
    assert decode_body(b'{"x": [1]}', "application/json; charset=utf-8") == ({"x": [1]}, JSON)
    assert decode_body(b'{"x": [1]}', None) == ({"x": [1]}, JSON)
    with pytest.raises(UnsupportedMediaType, match="text/plain"):
        decode_body(b"hello", "text/plain")


def test_reply_format_follows_accept_then_request():
    assert reply_format(FRAMED, None) == FRAMED
    assert reply_format(FRAMED, "application/json") == JSON
    assert reply_format(JSON, "*/*") == JSON
    assert reply_format(JSON, "text/html, application/x-binserve;q=0.9") == FRAMED


@pytest.mark.parametrize("fmt", [FRAMED, PICKLE, JSON])
def test_encode_body_round_trips(fmt):
    body, ctype = encode_body({"y": np.arange(4, dtype=np.float32)}, fmt)
    out, got = decode_body(body, ctype)
    assert got == fmt
    assert np.array_equal(np.asarray(out["y"]), np.arange(4))


def test_as_array_conversions():
    assert as_array([[1, 2], [3, 4]], dtype=np.float32, name="x").dtype == np.float32
    assert as_array(np.arange(3, dtype=np.int32), dtype=np.int64, name="x").dtype == np.int64
    assert as_array(np.arange(3, dtype=np.int64), dtype=np.uint8, name="x").tolist() == [0, 1, 2]
    with pytest.raises(InvalidInput, match="'x' has values outside the range of uint8"):
        as_array(np.array([300]), dtype=np.uint8, name="x")
    with pytest.raises(InvalidInput, match="'x' has dtype float64, expected int64"):
        as_array(np.array([1.5]), dtype=np.int64, name="x")
    with pytest.raises(InvalidInput, match="ragged"):
        as_array([[1, 2], [3]], dtype=np.int64, name="x")
    with pytest.raises(InvalidInput, match="non-numeric"):
        as_array(["a"], dtype=np.int64, name="x")
