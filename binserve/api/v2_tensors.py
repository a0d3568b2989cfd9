"""Open Inference Protocol V2 tensors: JSON `data` and the binary tensor extension, in and out.

design: pure translation, no Flask. A request body is either all JSON, or a JSON header of
`Inference-Header-Content-Length` bytes followed by the inputs' raw bytes in the order the header
lists them (`parameters.binary_data_size` each). Every size is checked against the bytes actually
there before anything is built, so a tensor can never be larger than the body that carried it:
fixed-size datatypes must match shape x itemsize exactly, BYTES elements (4-byte little-endian
length + bytes) are counted against the data, and JSON tensors are bounded by the JSON limits.
Binary inputs are zero-copy views of the body.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from binary_protocol import Limits, as_array, json_to_dict
from binserve.errors import BadRequest, InvalidInput, LimitExceeded

#: V2 datatypes with a numpy dtype (little-endian on the wire)
DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
# BF16 has no numpy dtype: its 2-byte words are widened to float32 (exact). BYTES are strings.
DATATYPES = (*DTYPES, "BF16", "BYTES")
_BY_DTYPE = {dt: name for name, dt in DTYPES.items()}
# Inputs (and requested outputs) per request: a model has a handful; more is malformed or hostile.
_MAX_INPUTS = 64


def datatype_of(dtype: np.dtype | None) -> str:
    """The V2 datatype of a numpy dtype; None (text) and string dtypes are BYTES."""
    if dtype is None or np.dtype(dtype).kind in "USO":
        return "BYTES"
    return _BY_DTYPE[np.dtype(dtype).newbyteorder("=")]


@dataclass(frozen=True)
class Tensor:
    """One input tensor of a request: its value is an ndarray, or a flat list for BYTES (bytes from the
    binary extension, str from JSON)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    value: object


@dataclass(frozen=True)
class Requested:
    """An output the request asked for, and whether it wants it in binary."""

    name: str
    binary: bool | None  # None: the request-level default


@dataclass(frozen=True)
class InferRequest:
    """A parsed V2 inference request."""

    id: str | None
    inputs: list[Tensor]
    outputs: list[Requested] | None  # None: every output
    binary_outputs: bool  # the request-level default (`parameters.binary_data_output`)
    timeout_us: object  # `parameters.timeout` as sent (microseconds), checked by the caller


def _field(obj: dict, key: str, kind: type, where: str, default=None):
    """obj[key] when it is a `kind` (bools are not ints here), `default` when absent; 400 otherwise."""
    if key not in obj:
        return default
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"{where}: '{key}' must be a {kind.__name__}")
    return value


def _shape(tensor: dict, where: str, limits: Limits) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"{where}: 'shape' must be a list of ints")
    if len(shape) > limits.max_array_dims:
        raise BadRequest(f"{where}: 'shape' has {len(shape)} dimensions; at most {limits.max_array_dims}")
    if any(d < 0 for d in shape):
        raise BadRequest(f"{where}: 'shape' {shape} has a negative dimension")
    return tuple(shape)


def parse_request(body: bytes, header_length: str | None, limits: Limits, max_strings: int = 2048) -> InferRequest:
    """A V2 inference request from its body (and `Inference-Header-Content-Length`, if sent).

    `max_strings` bounds the BYTES elements of the request (texts: one sample each), checked before
    any is built: a 4-byte empty element would otherwise become a ~60-byte Python string."""
    view = memoryview(body)
    if header_length is None:
        header, binary = json_to_dict(view, limits), view[0:0]
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
        header, binary = json_to_dict(view[:n], limits), view[n:]
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise BadRequest("'inputs' must be a non-empty list of tensor objects")
    if len(inputs) > _MAX_INPUTS:
        raise BadRequest(f"'inputs' lists {len(inputs)} tensors; at most {_MAX_INPUTS}")
    strings = 0
    for i, t in enumerate(inputs):
        if t.get("datatype") == "BYTES":
            shape = _shape(t, f"input {i}", limits)
            strings += math.prod(shape)
    if strings > max_strings:
        raise LimitExceeded(
            f"the request holds {strings} BYTES elements; at most {max_strings} (max_queue_samples): split it"
        )
    tensors, offset, seen = [], 0, set()
    for i, t in enumerate(inputs):
        name = _field(t, "name", str, f"input {i}")
        if name is None:
            raise BadRequest(f"input {i} has no 'name'")
        if name in seen:
            raise BadRequest(f"input {name!r} is listed twice")
        seen.add(name)
        tensor, offset = _parse_input(t, name, binary, offset, limits)
        tensors.append(tensor)
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data follow the last input's")
    params = _field(header, "parameters", dict, "request", {})
    outputs = header.get("outputs")
    requested = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise BadRequest("'outputs' must be a list of objects with a 'name'")
        if len(outputs) > _MAX_INPUTS:
            raise BadRequest(f"'outputs' lists {len(outputs)} tensors; at most {_MAX_INPUTS}")
        names = [o.get("name") for o in outputs]
        if len(set(map(str, names))) != len(names):  # each would be encoded again: a reply many times the model's
            raise BadRequest(f"'outputs' names a tensor twice: {names}")
        requested = []
        for i, o in enumerate(outputs):
            name = _field(o, "name", str, f"output {i}")
            if name is None:
                raise BadRequest(f"output {i} has no 'name'")
            binary_data = _field(_field(o, "parameters", dict, f"output {name!r}", {}), "binary_data", bool, name)
            requested.append(Requested(name, binary_data))
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    binary_outputs = _field(params, "binary_data_output", bool, "parameters", False)
    return InferRequest(request_id, tensors, requested, bool(binary_outputs), params.get("timeout"))


def _parse_input(t: dict, name: str, binary: memoryview, offset: int, limits: Limits) -> tuple[Tensor, int]:
    where = f"input {name!r}"
    datatype = _field(t, "datatype", str, where)
    if datatype not in DATATYPES:
        raise BadRequest(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    shape = _shape(t, where, limits)
    count = math.prod(shape)
    params = _field(t, "parameters", dict, where, {})
    size = _field(params, "binary_data_size", int, where)
    if size is not None:
        if "data" in t:
            raise BadRequest(f"{where} has both 'data' and 'binary_data_size'")
        if size < 0 or offset + size > len(binary):
            raise BadRequest(f"{where}: binary_data_size {size} runs past the {len(binary) - offset} bytes left")
        chunk = binary[offset : offset + size]
        return Tensor(name, datatype, shape, _from_binary(chunk, datatype, shape, count, where)), offset + size
    if "data" not in t:
        raise BadRequest(f"{where} has neither 'data' nor 'parameters.binary_data_size'")
    return Tensor(name, datatype, shape, _from_json(t["data"], datatype, shape, count, where)), offset


def _from_binary(chunk: memoryview, datatype: str, shape: tuple, count: int, where: str):
    if datatype == "BYTES":
        return _bytes_elements(chunk, count, where)
    itemsize = 2 if datatype == "BF16" else DTYPES[datatype].itemsize
    if len(chunk) != count * itemsize:
        raise BadRequest(f"{where}: shape {list(shape)} of {datatype} needs {count * itemsize} bytes, got {len(chunk)}")
    if datatype == "BF16":
        words = np.frombuffer(chunk, dtype="<u2")
        return (words.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(chunk, dtype=DTYPES[datatype].newbyteorder("<")).reshape(shape)


def _bytes_elements(chunk: memoryview, count: int, where: str) -> list[bytes]:
    # every element costs at least its 4-byte length, so the count is bounded by the data
    if count * 4 > len(chunk):
        raise BadRequest(f"{where}: {count} BYTES elements cannot fit in {len(chunk)} bytes")
    out, pos, raw = [], 0, bytes(chunk)
    for i in range(count):
        if pos + 4 > len(raw):
            raise BadRequest(f"{where}: element {i} of {count} is missing")
        n = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4
        if pos + n > len(raw):
            raise BadRequest(f"{where}: element {i} declares {n} bytes; {len(raw) - pos} are left")
        out.append(raw[pos : pos + n])  # text or an encoded image: the model's input decides (v2.py)
        pos += n
    if pos != len(raw):
        raise BadRequest(f"{where}: {len(raw) - pos} bytes follow the last of its {count} elements")
    return out


def utf8(raw: bytes | str, where: str, i: int) -> str:
    """A BYTES element as text (a JSON element already is one); 400 naming it when not UTF-8."""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{where}: element {i} is not valid UTF-8 text") from None


def _flatten(data) -> list:
    """Row-major elements of `data` (flat, or nested lists as V2 allows)."""
    if not isinstance(data, list):
        return [data]
    out, todo = [], [iter(data)]
    while todo:
        for item in todo[-1]:
            if isinstance(item, list):
                todo.append(iter(item))
                break
            out.append(item)
        else:
            todo.pop()
    return out


def _from_json(data, datatype: str, shape: tuple, count: int, where: str):
    flat = _flatten(data)
    if len(flat) != count:
        raise BadRequest(f"{where}: shape {list(shape)} holds {count} elements; 'data' has {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(s, str) for s in flat):
            raise InvalidInput(f"{where}: BYTES data in JSON must be strings")
        return flat
    if not all(type(v) in (int, float, bool) for v in flat):
        raise InvalidInput(f"{where}: {datatype} data must be numbers")
    dtype = np.dtype(np.float32) if datatype == "BF16" else DTYPES[datatype]
    return as_array(flat, dtype=dtype, name=where).reshape(shape)


def _blob(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for s in arr.ravel().tolist():
            b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
            parts += [len(b).to_bytes(4, "little"), b]
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def encode_response(
    model: str, version: str, request_id: str | None, outputs: list[tuple[str, np.ndarray, bool]]
) -> tuple[bytes, dict[str, str]]:
    """A V2 response body and its headers; `outputs` are (name, array, binary) in reply order."""
    entries, blobs = [], []
    for name, value, binary in outputs:
        arr = np.asarray(value)
        datatype = datatype_of(arr.dtype)
        entry = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            blob = _blob(arr, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [str(s) for s in arr.ravel().tolist()] if datatype == "BYTES" else arr.ravel().tolist()
        entries.append(entry)
    reply = {"model_name": model, "model_version": version, "outputs": entries}
    if request_id is not None:
        reply["id"] = request_id
    head = json.dumps(reply, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def check_timeout_us(value) -> float | None:
    """`parameters.timeout` (microseconds, as Triton's) as milliseconds, or None when absent."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise BadRequest(f"parameters.timeout must be a positive number of microseconds, got {value!r}")
    return value / 1000.0
