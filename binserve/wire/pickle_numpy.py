"""The numpy side of the safe pickle VM: which globals exist, and how numpy objects are rebuilt.

design: a pickle names numpy's reconstruction functions as globals; here each allowed
(module, name) pair maps to a sentinel (`Global`) - nothing is imported - and `reduce`/`build`
dispatch on the sentinel, checking every argument before numpy sees it: dtype codes and numpy's
canonical dtype state, shape against data length, byte order, and the dimensions of arrays that
hold no bytes. Arrays come back as views of the body. `dtype_run` decodes numpy's fixed 21-opcode
dtype sequence in one regex match (the common case), falling back to the generic loop when any
byte differs. The functions take the VM (`safe_pickle._Machine`) for its errors, limits and memo.
"""

from __future__ import annotations

import math
import re

import numpy as np

from binserve.errors import ProtocolError

# numpy dtype codes a request may carry: bool, ints, unsigned ints, IEEE floats and complex.
# Platform-dependent long double ('f16', 'c32') and every object/void/str/datetime kind are refused.
DTYPE_CODES = frozenset("b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8 c8 c16".split())
_DTYPE_CACHE: dict[tuple, np.dtype] = {}


class Global:
    """Sentinel standing for an allowed global; only REDUCE (and _reconstruct's arg) may use it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


G_DTYPE = Global("numpy.dtype")
G_NDARRAY = Global("numpy.ndarray")
G_RECONSTRUCT = Global("numpy._core.multiarray._reconstruct")
G_SCALAR = Global("numpy._core.multiarray.scalar")
G_FROMBUFFER = Global("numpy._core.numeric._frombuffer")
G_ENCODE = Global("_codecs.encode")
G_BYTES = Global("builtins.bytes")

GLOBALS = {
    ("numpy", "dtype"): G_DTYPE,
    ("numpy", "ndarray"): G_NDARRAY,
    ("numpy._core.multiarray", "_reconstruct"): G_RECONSTRUCT,
    ("numpy.core.multiarray", "_reconstruct"): G_RECONSTRUCT,
    ("numpy._core.multiarray", "scalar"): G_SCALAR,
    ("numpy.core.multiarray", "scalar"): G_SCALAR,
    ("numpy._core.numeric", "_frombuffer"): G_FROMBUFFER,
    ("numpy.core.numeric", "_frombuffer"): G_FROMBUFFER,
    # protocol 2 has no bytes opcode: bytes are pickled as _codecs.encode(str, 'latin1')
    ("_codecs", "encode"): G_ENCODE,
    # ... and the empty bytes (an empty array's data) as bytes()
    ("__builtin__", "bytes"): G_BYTES,
    ("builtins", "bytes"): G_BYTES,
}


class Pending:
    """`numpy.dtype(code, ...)` or `_reconstruct(ndarray, (0,), b'b')` before its BUILD.

    BUILD sets `result`; memo entries keep pointing here, and BINGET hands out the result.
    """

    __slots__ = ("code", "result")

    def __init__(self, code: str | None) -> None:
        self.code = code  # the dtype code; None for an array
        self.result = None


def virtual_bytes(shape: tuple, itemsize: int) -> int:
    """Bytes the array would hold with each empty dimension counted as 1: what iterating it costs."""
    n = itemsize
    for d in shape:
        if d > 1:
            n *= d
    return n


def dtype_from_state(code: str, state) -> np.dtype:
    """Build the dtype for `code` whose pickled state is exactly numpy's canonical one."""
    key = (code, state)
    try:
        return _DTYPE_CACHE[key]
    except (KeyError, TypeError):
        pass
    if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|"):
        raise ProtocolError(f"dtype {code!r} has a non-canonical state {state!r}")
    dt = np.dtype(code)
    if state[1] != "|":
        dt = dt.newbyteorder(state[1])
    if dt.__reduce__()[2] != state:
        raise ProtocolError(f"dtype {code!r} has a non-canonical state {state!r}")
    if len(_DTYPE_CACHE) < 256:
        _DTYPE_CACHE[key] = dt
    return dt


def lookup(vm, module: str, name: str) -> Global:
    """The sentinel of an allowed (module, name) pair; anything else is refused by name."""
    g = GLOBALS.get((module, name))
    if g is None:
        raise vm.fail(f"global '{module}.{name}' is not allowed")
    return g


def check_shape(vm, shape, dtype: np.dtype, nbytes: int, what: str) -> None:
    """A shape of non-negative ints whose bytes match the data, and whose dimensions fit the budget."""
    lim = vm.limits
    if type(shape) is not tuple or len(shape) > lim.max_array_dims:
        raise vm.fail(
            f"{what}{vm.where()} has an invalid shape {shape!r} (a tuple of at most {lim.max_array_dims} ints expected)"
        )
    for n in shape:
        if type(n) is not int or n < 0:
            raise vm.fail(f"{what}{vm.where()} has an invalid shape {shape!r}")
    want = math.prod(shape) * dtype.itemsize
    if want > lim.max_array_bytes:
        raise vm.too_large(
            f"{what}{vm.where()} of shape {shape} is {want} bytes, over the {lim.max_array_bytes}-byte limit"
        )
    if want != nbytes:
        raise vm.fail(f"{what}{vm.where()} declares {want} bytes, {nbytes} present")
    if not want and virtual_bytes(shape, dtype.itemsize) > min(vm.budget, lim.max_array_bytes):
        raise vm.too_large(
            f"{what}{vm.where()} of shape {shape} holds no data but its dimensions are over the "
            f"{min(vm.budget, lim.max_array_bytes)}-byte limit (empty dimensions counted as 1)"
        )


def as_bytes(vm, obj, what: str):
    """`obj` if it is an array's data (a view of the body, or bytes)."""
    if type(obj) is memoryview or type(obj) is bytes:
        return obj
    raise vm.fail(f"{what}{vm.where()} expects bytes, got {type(obj).__name__}")


def as_dtype(vm, obj, what: str) -> np.dtype:
    """`obj` if it is a dtype that BUILD produced."""
    if not isinstance(obj, np.dtype):
        raise vm.fail(f"{what}{vm.where()} expects a dtype, got {type(obj).__name__}")
    return obj


def reduce(vm, func, args):
    """REDUCE: call an allowed global on checked arguments (dtype and array placeholders, arrays)."""
    if type(func) is not Global:
        raise vm.fail(f"REDUCE on a {type(func).__name__}; only allowed numpy globals may be called")
    if type(args) is not tuple:
        raise vm.fail("REDUCE arguments must be a tuple")
    if func is G_FROMBUFFER:
        if len(args) != 4:
            raise vm.fail("_frombuffer expects (buffer, dtype, shape, order)")
        buf = as_bytes(vm, args[0], "array")
        dtype = as_dtype(vm, args[1], "array")
        if args[3] != "C" and args[3] != "F":
            raise vm.fail(f"array{vm.where()} has an invalid order {args[3]!r}")
        check_shape(vm, args[2], dtype, len(buf), "array")
        return np.frombuffer(buf, dtype=dtype).reshape(args[2], order=args[3])
    if func is G_DTYPE:
        code = args[0] if args else None
        if (
            len(args) != 3
            or type(code) is not str
            or code not in DTYPE_CODES
            or args[1] not in (False, 0)
            or args[2] not in (True, 1)
        ):
            raise vm.fail(f"dtype {code!r} of{vm.where() or ' a value'} is not allowed (numeric and bool dtypes only)")
        return Pending(code)
    if func is G_SCALAR:
        if len(args) != 2:
            raise vm.fail("scalar expects (dtype, bytes)")
        dtype = as_dtype(vm, args[0], "scalar")
        raw = as_bytes(vm, args[1], "scalar")
        if len(raw) != dtype.itemsize:
            raise vm.fail(f"scalar{vm.where()} declares {dtype.itemsize} bytes, {len(raw)} present")
        return np.frombuffer(raw, dtype=dtype)[0]
    if func is G_RECONSTRUCT:
        if (
            len(args) != 3
            or args[0] is not G_NDARRAY
            or args[1] != (0,)
            or bytes(as_bytes(vm, args[2], "_reconstruct")) != b"b"
        ):
            raise vm.fail("_reconstruct is allowed only as numpy pickles a plain ndarray")
        return Pending(None)
    if func is G_ENCODE:
        if len(args) != 2 or type(args[0]) is not str or args[1] != "latin1":
            raise vm.fail("_codecs.encode is allowed only as (str, 'latin1')")
        try:
            return args[0].encode("latin-1")
        except UnicodeEncodeError:
            raise vm.fail("_codecs.encode of a non-latin-1 string") from None
    if func is G_BYTES and args == ():
        return b""
    raise vm.fail(f"global '{func.name}' cannot be called with these arguments")


def build(vm, obj, state):
    """BUILD: set the state of a dtype or array placeholder, once, after checking it."""
    if type(obj) is not Pending:
        raise vm.fail(f"BUILD on a {type(obj).__name__} is not allowed")
    if obj.result is not None:
        raise vm.fail("BUILD on a numpy object that was already built")
    if obj.code is not None:
        obj.result = dtype_from_state(obj.code, state)
        return obj.result
    if type(state) is not tuple or len(state) != 5 or state[0] != 1 or type(state[3]) is not bool:
        raise vm.fail(f"array{vm.where()} has an invalid state")
    _, shape, dtype, fortran, raw = state
    dtype = as_dtype(vm, dtype, "array")
    raw = as_bytes(vm, raw, "array")
    check_shape(vm, shape, dtype, len(raw), "array")
    obj.result = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return obj.result


# numpy pickles every dtype (protocol 4-5, memoized) as the same 20-odd opcodes after the
# numpy.dtype global: dtype(code, False, True), then BUILD with the canonical state
# (3, byteorder, None, None, None, -1, -1, 0). Matching that run in one regex instead of
# interpreting it opcode by opcode is most of the cost of a small array; anything that does not
# match exactly (other memo ops, forged states) goes through the generic loop and its checks.
DTYPE_RUN = re.compile(
    rb"(\x94)?\x8c(?:\x02([a-z][0-9])|\x03([a-z][0-9][0-9]))\x94\x89\x88\x87\x94R\x94\(K\x03"
    rb"(?:\x8c\x01([<>|])\x94|h(.))NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b",
    re.DOTALL,
)
DTYPE_RUN_OPS = 21


def dtype_run(vm, pos: int) -> int:
    """Decode numpy's dtype run at `pos`, right after the numpy.dtype global was pushed.

    Returns the position after it, with the global on the stack replaced by the dtype and the memo
    filled as the run's MEMOIZE ops would have; or -1 (nothing changed) when it does not match.
    """
    m = DTYPE_RUN.match(vm.mv, pos, vm.end)
    if m is None:
        return -1
    memo = vm.memo
    lead, code2, code3, order, ref = m.groups()
    code = (code2 or code3).decode()
    if ref is not None:
        order = memo.get(ref[0])
        if type(order) is not str or order not in ("<", ">", "|"):
            return -1
    else:
        order = order.decode()
    if code not in DTYPE_CODES or len(memo) + 6 > vm.limits.max_memo:
        return -1
    state = (3, order, None, None, None, -1, -1, 0)
    try:
        dtype = dtype_from_state(code, state)
    except ProtocolError:
        return -1  # the generic loop reports it, naming the key
    if lead:
        memo[len(memo)] = G_DTYPE
    memo[len(memo)] = code
    memo[len(memo)] = (code, False, True)
    memo[len(memo)] = dtype
    if ref is None:
        memo[len(memo)] = order
    memo[len(memo)] = state
    vm.stack[-1] = dtype
    return m.end()
