"""What decoding may produce: the alias-counted budget, bounded memo/opcodes, strict strings, and
the peak allocation of bodies the decoder *accepts* (not only of the ones it refuses)."""

from __future__ import annotations

import gc
import pickle
import struct
import tracemalloc

import numpy as np
import pytest

from binary_protocol import LimitExceeded, Limits, ProtocolError, binary_to_dict, dict_to_binary
from binserve.errors import PayloadTooLarge
from binserve.wire import safe_pickle


def peak_of(fn) -> int:
    """Peak bytes traced while `fn` runs (its result is kept, so what it returns counts)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak


def too_large(body, match: str, limits: Limits | None = None) -> LimitExceeded:
    with pytest.raises(LimitExceeded, match=match) as info:
        binary_to_dict(body, limits) if limits else binary_to_dict(body)
    assert info.value.status_code == 413 and isinstance(info.value, (ProtocolError, PayloadTooLarge))
    return info.value


# --- the budget counts every reference to a repeated value -------------------------------------


def test_a_repeated_bytes_value_counts_once_per_reference():
    big = b"x" * (1 << 20)
    too_large(pickle.dumps({"texts": [big] * 2000}, protocol=5), "decodes into more than .* at 'texts'")


def test_a_repeated_text_counts_once_per_reference():
    text = "a " * (128 * 1024)
    err = too_large(pickle.dumps({"texts": [text] * 256}, protocol=5), "decodes into more than")
    assert "each reference to a repeated string, bytes or array counted" in str(err)


def test_a_repeated_array_counts_once_per_reference():
    img = np.zeros((480, 640, 3), np.uint8)
    body = pickle.dumps({"image": [img] * 1500}, protocol=5)  # pickle memoizes the repeats itself
    assert len(body) < 1_000_000
    too_large(body, "decodes into more than .* at 'image'")
    framed = dict_to_binary({"image": [img] * 100})  # one out-of-band buffer, 100 references
    too_large(framed, "decodes into more than", Limits(decode_base_bytes=1 << 20, decode_ratio=4))


def test_the_budget_scales_with_the_body_and_has_a_cap():
    lim = Limits(decode_base_bytes=1000, decode_ratio=4, max_decoded_bytes=10_000)
    assert lim.budget(0) == 1000 and lim.budget(500) == 3000 and lim.budget(10**9) == 10_000


def test_distinct_values_up_to_the_budget_are_accepted():
    texts = [f"text number {i} " * 20 for i in range(2048)]  # what a full queue of texts looks like
    out = binary_to_dict(pickle.dumps({"texts": texts}, protocol=5))
    assert out["texts"] == texts


# --- arrays: dimensions count even when the array holds no bytes --------------------------------


@pytest.mark.parametrize("shape", [(20_000_000, 0), (2**59, 0), (0, 2**40), (1, 2**31, 0, 3)])
def test_zero_byte_arrays_with_huge_dimensions_are_refused(shape):
    err = too_large(pickle.dumps({"input_ids": np.empty(shape, np.int64)}, protocol=5), "holds no data")
    assert "'input_ids'" in str(err)
    too_large(dict_to_binary({"input_ids": np.empty(shape, np.int64)}), "holds no data")


def test_small_empty_arrays_are_fine():
    out = binary_to_dict(pickle.dumps({"a": np.empty((3, 0), np.float32), "b": np.empty(0, np.int8)}, protocol=5))
    assert out["a"].shape == (3, 0) and out["b"].shape == (0,)


# --- memo, marks and opcodes are bounded -----------------------------------------------------------


def test_memo_is_bounded():
    too_large(b"\x80\x05}" + b"\x94" * 5000 + b".", "more than 1000 memo entries", Limits(max_memo=1000))
    too_large(b"\x80\x05}q\x01q\x02.", "more than 1 memo entries", Limits(max_memo=1))


def test_do_nothing_opcodes_are_bounded_by_what_they_produce():
    body = b"\x80\x05" + b"N0" * 200_000 + b"}."
    too_large(body, "pickle opcodes produced only 0 bytes")
    assert len(body) > 65536 * 2


def test_opcodes_have_an_absolute_cap():
    ints = list(range(300, 30_300))  # 30k BININT2 opcodes: more than the cap below
    too_large(pickle.dumps({"ids": ints}, protocol=5), "more than 20000 pickle opcodes", Limits(max_opcodes=20_000))
    assert binary_to_dict(pickle.dumps({"ids": ints}, protocol=5))["ids"] == ints  # the default allows it


def test_open_marks_are_bounded():
    with pytest.raises(ProtocolError, match="more than 4096 open MARKs"):
        binary_to_dict(b"\x80\x05" + b"(" * 5000 + b"}.")


# --- strings are strict UTF-8 ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_lone_surrogates_are_refused_naming_the_key(protocol):
    with pytest.raises(ProtocolError, match="a string in 'texts' is not valid UTF-8") as info:
        binary_to_dict(pickle.dumps({"texts": ["fine", "\ud800"]}, protocol=protocol))
    assert info.value.status_code == 400


def test_long_strings_are_counted_as_unicode():
    assert safe_pickle._str_cost("a" * 10) == 66 and safe_pickle._str_cost("é" * 10) == 96


# --- the dtype fast path is exactly as strict as the generic loop ----------------------------------


def test_dtype_fast_path_gives_what_the_generic_loop_gives(monkeypatch):
    codes = ("u1", "i2", "<i4", ">i8", "f2", "<f4", ">f8", "c8", "?")
    data = {k: (np.arange(6) % 2).astype(k).reshape(2, 3) for k in codes}
    body = pickle.dumps(data, protocol=5)
    fast = binary_to_dict(body)
    monkeypatch.setattr(safe_pickle, "_dtype_run", lambda vm, pos: -1)
    slow = binary_to_dict(body)
    for k, v in data.items():
        assert fast[k].dtype == slow[k].dtype == v.dtype and (fast[k] == v).all() and (slow[k] == v).all()


def test_dtype_fast_path_refuses_forged_states():
    body = pickle.dumps({"x": np.zeros(2, np.float32)}, protocol=5)
    canonical = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    assert canonical in body
    with pytest.raises(ProtocolError, match="non-canonical state"):
        binary_to_dict(body.replace(canonical, b"J\x08\x00\x00\x00J\x01\x00\x00\x00K\x00t"))
    forged_order = body.replace(b"\x8c\x01<\x94", b"\x8c\x01|\x94")  # '|' is not f4's byte order
    with pytest.raises(ProtocolError, match="non-canonical state"):
        binary_to_dict(forged_order)
    with pytest.raises(ProtocolError, match="dtype 'O8' of 'x' is not allowed"):
        binary_to_dict(body.replace(b"\x8c\x02f4\x94", b"\x8c\x02O8\x94"))


# --- accepted bodies: the decoder allocates little beyond what it returns ------------------------


def image_and_state() -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 255, (480, 640, 3), dtype=np.uint8),
        "state": rng.standard_normal(6).astype(np.float32),
    }


@pytest.mark.parametrize("encode", [dict_to_binary, lambda d: pickle.dumps(d, protocol=5)], ids=["framed", "pickle"])
def test_accepted_arrays_are_views_not_copies(encode):
    body = encode(image_and_state())
    peak = peak_of(lambda: binary_to_dict(body))
    assert peak < 64 * 1024, f"decoding a {len(body)}-byte body allocated {peak} bytes"


def test_accepted_texts_cost_about_their_size():
    texts = [f"sentence {i} " * 30 for i in range(2000)]
    body = pickle.dumps({"texts": texts}, protocol=5)
    peak = peak_of(lambda: binary_to_dict(body))
    assert peak < 2 * len(body) + 256 * 1024, f"{peak} bytes for a {len(body)}-byte body"


def test_accepted_token_lists_stay_within_the_budget():
    ids = [[101, *range(1000, 1126), 102] for _ in range(256)]
    body = pickle.dumps({"input_ids": ids}, protocol=5)
    peak = peak_of(lambda: binary_to_dict(body))
    assert peak <= Limits().budget(len(body))
    assert peak < 16 * len(body), f"{peak} bytes for a {len(body)}-byte body"  # Python ints and lists


def test_a_body_decoding_right_up_to_the_budget_is_accepted():
    lim = Limits(decode_base_bytes=1, decode_ratio=64)
    value = b"y" * 1000
    ok = pickle.dumps({"b": [value] * 20}, protocol=5)  # ~21 kB produced from ~1.1 kB of body x 64
    assert len(binary_to_dict(ok, lim)["b"]) == 20
    too_large(pickle.dumps({"b": [value] * 200}, protocol=5), "decodes into more than", lim)


def test_struct_helpers_unchanged():
    # BININT of -1 as numpy writes it, through the fast loop
    assert binary_to_dict(b"\x80\x05}\x8c\x01a" + b"J" + struct.pack("<i", -1) + b"s.")["a"] == -1
