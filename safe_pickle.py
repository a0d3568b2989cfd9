"""A pickle decoder that is safe on hostile bytes and gives numpy arrays as views of the input.

design: `pickle.loads` runs whatever callable a pickle names, and even a restricted `Unpickler`
allocates every declared length before reading it. This module is instead a small pickle virtual
machine written here, over a memoryview of the body:

* only the opcodes that protocols 2-5 use for dicts, lists, tuples, str, bytes, ints, floats, bools,
  None and numpy arrays/dtypes/scalars are known; every other opcode (INST, OBJ, NEWOBJ*, EXT*,
  PERSID, sets, text-mode protocol 0 ops, ...) is refused by name;
* GLOBAL/STACK_GLOBAL resolve only exact (module, name) pairs to sentinels - nothing is imported
  and no dotted name is looked up; REDUCE dispatches on the sentinel and checks every argument
  (dtype codes and canonical dtype state, shape against data length, ...) before numpy sees it;
  BUILD is accepted only on the two placeholders that numpy's own pickles build (dtype, array);
* every declared length is checked against the bytes that remain before anything is sliced, and
  bytes-like payloads are slices of the input, so arrays cost no copy and no allocation;
* containers are sealed once placed inside another, so each container's height and "visited item"
  weight (aliases counted on every visit) are exact when it is placed, and nesting depth and item
  bombs fail at the opcode that would exceed the limit, long before memory grows.
"""

from __future__ import annotations

import math
import pickletools
import struct
from dataclasses import dataclass

import numpy as np

from errors import ProtocolError

__all__ = ["Limits", "ProtocolError", "safe_loads"]


@dataclass(frozen=True)
class Limits:
    """Bounds applied while decoding a request body (all sizes in bytes)."""

    max_body_bytes: int = 256 * 1024 * 1024
    max_depth: int = 32
    max_items: int = 4 * 1024 * 1024  # a 480x640x3 image as JSON lists is 1.2M items
    max_str_bytes: int = 16 * 1024 * 1024
    max_array_dims: int = 32
    max_array_bytes: int = 256 * 1024 * 1024
    max_buffers: int = 1024
    # CPython's pickler batches APPENDS/SETITEMS by 1000, so real payloads keep a few thousand
    # items on the VM's stack at most; a flood of objects that are never nested stops here.
    max_stack: int = 4096

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = Limits()

# numpy dtype codes a request may carry: bool, ints, unsigned ints, IEEE floats and complex.
# Platform-dependent long double ('f16', 'c32') and every object/void/str/datetime kind are refused.
DTYPE_CODES = frozenset("b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8 c8 c16".split())
_MAX_LONG_BYTES = 32  # ints wider than 256 bits are not token ids or shapes; refuse them
_MAX_GLOBAL_LINE = 128


class _Global:
    """Sentinel standing for an allowed global; only REDUCE (and _reconstruct's arg) may use it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_G_DTYPE = _Global("numpy.dtype")
_G_NDARRAY = _Global("numpy.ndarray")
_G_RECONSTRUCT = _Global("numpy._core.multiarray._reconstruct")
_G_SCALAR = _Global("numpy._core.multiarray.scalar")
_G_FROMBUFFER = _Global("numpy._core.numeric._frombuffer")
_G_ENCODE = _Global("_codecs.encode")
_G_BYTES = _Global("builtins.bytes")

_GLOBALS = {
    ("numpy", "dtype"): _G_DTYPE,
    ("numpy", "ndarray"): _G_NDARRAY,
    ("numpy._core.multiarray", "_reconstruct"): _G_RECONSTRUCT,
    ("numpy.core.multiarray", "_reconstruct"): _G_RECONSTRUCT,
    ("numpy._core.multiarray", "scalar"): _G_SCALAR,
    ("numpy.core.multiarray", "scalar"): _G_SCALAR,
    ("numpy._core.numeric", "_frombuffer"): _G_FROMBUFFER,
    ("numpy.core.numeric", "_frombuffer"): _G_FROMBUFFER,
    # protocol 2 has no bytes opcode: bytes are pickled as _codecs.encode(str, 'latin1')
    ("_codecs", "encode"): _G_ENCODE,
    # ... and the empty bytes (an empty array's data) as bytes()
    ("__builtin__", "bytes"): _G_BYTES,
    ("builtins", "bytes"): _G_BYTES,
}


class _PendingDtype:
    """`numpy.dtype(code, ...)` before its BUILD; becomes a real dtype once the state checks out."""

    __slots__ = ("code",)

    def __init__(self, code: str) -> None:
        self.code = code


class _PendingArray:
    """`_reconstruct(ndarray, (0,), b'b')` before its BUILD (protocols 2-4 arrays)."""

    __slots__ = ()


class _Meta:
    """What the VM knows of a container it built: nesting height, visited-item weight, sealed."""

    __slots__ = ("obj", "height", "weight", "sealed", "flags")

    def __init__(self, obj, height: int, weight: int, flags: int) -> None:
        self.obj = obj  # keeps the object alive, so its id() stays unique while decoding
        self.height = height
        self.weight = weight
        self.sealed = False
        self.flags = flags  # _RAW / _OPAQUE: what sits somewhere below


_RAW = 1  # a memoryview (bytes payload) sits below: give it its own bytes when it becomes a value
_OPAQUE = 2  # numpy internals (dtype, global) sit below: fine as REDUCE arguments, never as a value
_NONE_TYPE = type(None)
_SCALAR_TYPES = (bool, int, float, str, bytes, _NONE_TYPE)
_PENDING = (_PendingDtype, _PendingArray)
_OPNAMES = {ord(op.code): op.name for op in pickletools.opcodes if len(op.code) == 1}
_DTYPE_CACHE: dict[tuple, np.dtype] = {}


def _dtype_from_state(code: str, state) -> np.dtype:
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


class _Machine:
    """One decode: the stack, memo, marks and limit accounting over one memoryview."""

    __slots__ = (
        "mv",
        "pos",
        "end",
        "buffers",
        "next_buffer",
        "limits",
        "stack",
        "marks",
        "memo",
        "meta",
        "pending_keys",
        "key_hint",
        "op_pos",
        "done",
    )

    def __init__(self, mv: memoryview, start: int, end: int, buffers, limits: Limits) -> None:
        self.mv = mv
        self.pos = start
        self.end = end
        self.buffers = buffers
        self.next_buffer = 0
        self.limits = limits
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.meta: dict[int, _Meta] = {}
        self.pending_keys: dict[int, list[int]] = {}
        self.key_hint: str | None = None
        self.op_pos = start
        self.done = False  # set by STOP

    # --- reading -------------------------------------------------------------------------
    def fail(self, message: str) -> ProtocolError:
        where = f" (at byte {self.op_pos})"
        return ProtocolError(message + where)

    def take(self, n: int, what: str) -> memoryview:
        """The next n bytes; the length is checked against what remains before any use."""
        if n < 0:
            raise self.fail(f"{what} declares a negative length {n}")
        pos = self.pos
        if n > self.end - pos:
            raise self.fail(f"{what} declares {n} bytes, {self.end - pos} present")
        self.pos = pos + n
        return self.mv[pos : pos + n]

    def unpack(self, fmt: struct.Struct, what: str):
        return fmt.unpack(self.take(fmt.size, what))[0]

    def byte(self, what: str) -> int:
        if self.pos >= self.end:
            raise self.fail(f"{what} is truncated")
        self.pos += 1
        return self.mv[self.pos - 1]

    # --- the stack -----------------------------------------------------------------------
    def pop_mark(self) -> list:
        if not self.marks:
            raise self.fail("MARK expected but none is open")
        m = self.marks.pop()
        items = self.stack[m:]
        del self.stack[m:]
        return items

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self.fail("stack underflow")
        return self.stack.pop()

    def top(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self.fail("stack underflow")
        return self.stack[-1]

    def push_str(self, s: str) -> None:
        # Remember the latest dict key, so errors in the value that follows can name it.
        st = self.stack
        if st and type(st[-1]) is dict:
            self.key_hint = s
        elif self.marks:
            m = self.marks[-1]
            if m and type(st[m - 1]) is dict and (len(st) - m) % 2 == 0:
                self.key_hint = s
        st.append(s)

    def where(self) -> str:
        """ " 'key'" for the dict key whose value is being decoded, to name it in errors."""
        return f" {self.key_hint!r}" if self.key_hint is not None else ""

    # --- containers and limits -----------------------------------------------------------
    def new_container(self, obj, height: int = 1, weight: int = 0, flags: int = 0) -> None:
        self.meta[id(obj)] = _Meta(obj, height, weight, flags)

    def child(self, item, into: _Meta | None):
        """Check `item` may go into `into` (None: a tuple) and seal it; returns (item, height, weight, flags).

        flags: _RAW when a bytes payload (memoryview) sits below, _OPAQUE when numpy internals
        (dtypes, globals) do. Tuples may hold internals, since REDUCE/BUILD take their arguments as
        tuples; lists and dicts - the payload itself - may not.
        """
        t = type(item)
        if t in _SCALAR_TYPES or t is np.ndarray:
            return item, 0, 1, 0
        if t is memoryview:
            return item, 0, 1, _RAW
        m = self.meta.get(id(item))
        if m is not None:
            if m is into:
                raise self.fail("a container may not contain itself")
            if into is not None and m.flags & _OPAQUE:
                raise self.fail("a tuple of numpy internals used as a value")
            m.sealed = True
            return item, m.height, m.weight + 1, m.flags
        if t is tuple:  # a tuple of leaves only (make_tuple keeps no _Meta for those)
            flags = 0
            for x in item:
                tx = type(x)
                if tx is memoryview:
                    flags |= _RAW
                elif not (tx in _SCALAR_TYPES or tx is np.ndarray or isinstance(x, np.generic)):
                    flags |= _OPAQUE
            if into is not None and flags & _OPAQUE:
                raise self.fail("a tuple of numpy internals used as a value")
            if flags & _RAW:
                self.new_container(item, 1, len(item), flags)  # so that materialize() finds it
            return item, 1, len(item) + 1, flags
        if t is list or t is dict:  # still empty: its _Meta is made now, sealed
            self.new_container(item)
            self.meta[id(item)].sealed = True
            return item, 1, 1, 0
        if isinstance(item, np.generic):
            return item, 0, 1, 0
        if into is None:
            return item, 0, 1, _OPAQUE
        if t is _Global:
            raise self.fail(f"global '{item.name}' used as a value")
        if t is _PendingDtype or t is _PendingArray:
            raise self.fail("numpy object used before its state was set (missing BUILD)")
        if isinstance(item, np.dtype):
            raise self.fail("a numpy dtype is not a supported value; send an array")
        raise self.fail(f"value of type {t.__name__} is not supported")

    def grow(self, m: _Meta, height: int, weight: int) -> None:
        """Account items just placed in list/dict `m` (their bytes payloads were materialized)."""
        lim = self.limits
        if height + 1 > m.height:
            m.height = height + 1
            if m.height > lim.max_depth:
                raise self.fail(f"nesting deeper than {lim.max_depth} levels")
        m.weight += weight
        if m.weight > lim.max_items:
            raise self.fail(f"more than {lim.max_items} items (aliases counted on every visit)")

    def target(self, obj, kind: type) -> _Meta:
        if type(obj) is not kind:
            raise self.fail(f"expected a {kind.__name__} to add items to, got {type(obj).__name__}")
        m = self.meta.get(id(obj))
        if m is None:
            self.new_container(obj)
            m = self.meta[id(obj)]
        elif m.sealed:
            raise self.fail(f"{kind.__name__} modified after it was placed in another container")
        return m

    def materialize(self, item):
        """Give bytes payloads stored as values their own bytes (they are not array data)."""
        if type(item) is memoryview:
            return bytes(item)
        m = self.meta.get(id(item)) if type(item) is tuple else None
        if m is None or not m.flags & _RAW:
            return item  # lists and dicts were materialized as their items went in
        out = tuple(self.materialize(x) for x in item)
        self.new_container(out, m.height, m.weight)
        return out

    def make_tuple(self, items: list) -> None:
        t = tuple(items)
        meta = self.meta
        for x in items:
            tx = type(x)
            if tx is tuple or tx is list or tx is dict or id(x) in meta:
                break
        else:
            # Only leaves (scalars, buffers, arrays, numpy internals): the usual REDUCE argument
            # tuple. Tuples are immutable, so child() can work out its flags if it is ever placed.
            self.stack.append(t)
            return
        height = weight = flags = 0
        for x in items:
            _, h, w, f = self.child(x, None)
            height = max(height, h)
            weight += w
            flags |= f
        if height + 1 > self.limits.max_depth:
            raise self.fail(f"nesting deeper than {self.limits.max_depth} levels")
        if weight > self.limits.max_items:
            raise self.fail(f"more than {self.limits.max_items} items (aliases counted on every visit)")
        self.new_container(t, height + 1, weight, flags)
        self.stack.append(t)

    def append_items(self, lst, items: list) -> None:
        m = self.target(lst, list)
        height = weight = 0
        for x in items:
            x, h, w, f = self.child(x, m)
            if f:
                x = self.materialize(x)
            lst.append(x)
            height = max(height, h)
            weight += w
        self.grow(m, height, weight)

    def set_items(self, d, items: list) -> None:
        if len(items) % 2:
            raise self.fail("SETITEMS with an odd number of items")
        m = self.target(d, dict)
        height = weight = 0
        for i in range(0, len(items), 2):
            k = items[i]
            if type(k) is not str:
                raise self.fail(f"dict key of type {type(k).__name__}; keys must be str")
            v, h, w, f = self.child(items[i + 1], m)
            if f:
                v = self.materialize(v)
            d[k] = v
            height = max(height, h)
            weight += w + 1
        self.grow(m, height, weight)

    def memo_put(self, key: int) -> None:
        obj = self.top()
        self.memo[key] = obj
        if type(obj) is _PendingDtype or type(obj) is _PendingArray:
            self.pending_keys.setdefault(id(obj), []).append(key)

    def memo_get(self, key: int) -> None:
        try:
            obj = self.memo[key]
        except KeyError:
            raise self.fail(f"memo key {key} was never stored") from None
        if type(obj) is str:
            self.push_str(obj)
        else:
            self.stack.append(obj)

    # --- numpy reconstruction --------------------------------------------------------------
    def check_shape(self, shape, dtype: np.dtype, nbytes: int, what: str) -> None:
        lim = self.limits
        if type(shape) is not tuple or len(shape) > lim.max_array_dims:
            raise self.fail(
                f"{what}{self.where()} has an invalid shape {shape!r} (a tuple of at most "
                f"{lim.max_array_dims} ints expected)"
            )
        for n in shape:
            if type(n) is not int or n < 0:
                raise self.fail(f"{what}{self.where()} has an invalid shape {shape!r}")
        want = math.prod(shape) * dtype.itemsize
        if want > lim.max_array_bytes:
            raise self.fail(
                f"{what}{self.where()} of shape {shape} is {want} bytes, over the {lim.max_array_bytes}-byte limit"
            )
        if want != nbytes:
            raise self.fail(f"{what}{self.where()} declares {want} bytes, {nbytes} present")

    def as_bytes(self, obj, what: str):
        if type(obj) is memoryview or type(obj) is bytes:
            return obj
        raise self.fail(f"{what}{self.where()} expects bytes, got {type(obj).__name__}")

    def as_dtype(self, obj, what: str) -> np.dtype:
        if type(obj) is not np.dtype and not isinstance(obj, np.dtype):
            raise self.fail(f"{what}{self.where()} expects a dtype, got {type(obj).__name__}")
        return obj

    def reduce(self, func, args):
        if type(func) is not _Global:
            raise self.fail(f"REDUCE on a {type(func).__name__}; only allowed numpy globals may be called")
        if type(args) is not tuple:
            raise self.fail("REDUCE arguments must be a tuple")
        if func is _G_FROMBUFFER:
            if len(args) != 4:
                raise self.fail("_frombuffer expects (buffer, dtype, shape, order)")
            buf = self.as_bytes(args[0], "array")
            dtype = self.as_dtype(args[1], "array")
            if args[3] not in ("C", "F"):
                raise self.fail(f"array{self.where()} has an invalid order {args[3]!r}")
            self.check_shape(args[2], dtype, len(buf), "array")
            return np.frombuffer(buf, dtype=dtype).reshape(args[2], order=args[3])
        if func is _G_DTYPE:
            code = args[0] if args else None
            if (
                len(args) != 3
                or type(code) is not str
                or code not in DTYPE_CODES
                or args[1] not in (False, 0)
                or args[2] not in (True, 1)
            ):
                raise self.fail(
                    f"dtype {code!r} of{self.where() or ' a value'} is not allowed (numeric and bool dtypes only)"
                )
            return _PendingDtype(code)
        if func is _G_SCALAR:
            if len(args) != 2:
                raise self.fail("scalar expects (dtype, bytes)")
            dtype = self.as_dtype(args[0], "scalar")
            raw = self.as_bytes(args[1], "scalar")
            if len(raw) != dtype.itemsize:
                raise self.fail(f"scalar{self.where()} declares {dtype.itemsize} bytes, {len(raw)} present")
            return np.frombuffer(raw, dtype=dtype)[0]
        if func is _G_RECONSTRUCT:
            if (
                len(args) != 3
                or args[0] is not _G_NDARRAY
                or args[1] != (0,)
                or bytes(self.as_bytes(args[2], "_reconstruct")) != b"b"
            ):
                raise self.fail("_reconstruct is allowed only as numpy pickles a plain ndarray")
            return _PendingArray()
        if func is _G_ENCODE:
            if len(args) != 2 or type(args[0]) is not str or args[1] != "latin1":
                raise self.fail("_codecs.encode is allowed only as (str, 'latin1')")
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError:
                raise self.fail("_codecs.encode of a non-latin-1 string") from None
        if func is _G_BYTES and args == ():
            return b""
        raise self.fail(f"global '{func.name}' cannot be called with these arguments")

    def build(self, obj, state):
        if type(obj) is _PendingDtype:
            return _dtype_from_state(obj.code, state)
        if type(obj) is _PendingArray:
            if type(state) is not tuple or len(state) != 5 or state[0] != 1 or type(state[3]) is not bool:
                raise self.fail(f"array{self.where()} has an invalid state")
            _, shape, dtype, fortran, raw = state
            dtype = self.as_dtype(dtype, "array")
            raw = self.as_bytes(raw, "array")
            self.check_shape(shape, dtype, len(raw), "array")
            return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        raise self.fail(f"BUILD on a {type(obj).__name__} is not allowed")

    def replace_pending(self, pending, result) -> None:
        for key in self.pending_keys.pop(id(pending), ()):
            self.memo[key] = result


_I1 = struct.Struct("<B")
_I2 = struct.Struct("<H")
_I4 = struct.Struct("<i")
_U4 = struct.Struct("<I")
_U8 = struct.Struct("<Q")
_F8 = struct.Struct(">d")


def _underflow(vm: _Machine, need: int) -> None:
    if len(vm.stack) - (vm.marks[-1] if vm.marks else 0) < need:
        raise vm.fail("stack underflow")


def _run(vm: _Machine):  # noqa: C901 - one flat dispatch loop is the fastest pure-Python VM
    mv = vm.mv
    st = vm.stack
    memo = vm.memo
    marks = vm.marks
    end = vm.end
    max_stack = vm.limits.max_stack
    pos = vm.pos
    while True:
        if pos >= end:
            vm.op_pos = pos
            raise vm.fail("pickle data was truncated (no STOP opcode)")
        op = mv[pos]
        pos += 1
        # Fast path: the hottest opcodes of numpy's and dicts' pickles, handled on locals only.
        if op == 0x94:  # MEMOIZE
            if not st:
                vm.op_pos = pos - 1
                raise vm.fail("MEMOIZE on an empty stack")
            obj = st[-1]
            memo[len(memo)] = obj
            if type(obj) in _PENDING:
                vm.pending_keys.setdefault(id(obj), []).append(len(memo) - 1)
            continue
        if op == 0x8C:  # SHORT_BINUNICODE
            if pos < end and pos + 1 + mv[pos] <= end:
                n = mv[pos]
                try:
                    text = str(mv[pos + 1 : pos + 1 + n], "utf-8", "surrogatepass")
                except UnicodeDecodeError:
                    vm.op_pos = pos - 1
                    raise vm.fail("string is not valid UTF-8") from None
                pos += 1 + n
                vm.push_str(text)
            else:
                vm.op_pos = pos - 1
                raise vm.fail("SHORT_BINUNICODE is truncated")
        elif op == 0x4B:  # BININT1
            if pos >= end:
                vm.op_pos = pos - 1
                raise vm.fail("BININT1 is truncated")
            st.append(mv[pos])
            pos += 1
        elif op == 0x4A:  # BININT
            if pos + 4 > end:
                vm.op_pos = pos - 1
                raise vm.fail("BININT is truncated")
            st.append(_I4.unpack_from(mv, pos)[0])
            pos += 4
        elif op == 0x28:  # MARK
            marks.append(len(st))
            continue
        elif op == 0x4E:  # NONE
            st.append(None)
        elif op == 0x88:  # NEWTRUE
            st.append(True)
        elif op == 0x89:  # NEWFALSE
            st.append(False)
        else:
            # Slow path: opcodes that build objects or read longer arguments go through the
            # machine's methods, which read vm.pos and name vm.op_pos in their errors.
            vm.op_pos = pos - 1
            vm.pos = pos
            _slow_op(vm, op)
            if vm.done:
                return st[0]
            pos = vm.pos
        if len(st) > max_stack:
            vm.op_pos = pos
            raise vm.fail(f"more than {max_stack} items on the stack")


def _slow_op(vm: _Machine, op: int) -> None:  # noqa: C901 - one flat dispatch
    st = vm.stack
    if op == 0x68:  # BINGET
        vm.memo_get(vm.byte("BINGET"))
    elif op == 0x74:  # TUPLE
        vm.make_tuple(vm.pop_mark())
    elif op == 0x85:  # TUPLE1
        _underflow(vm, 1)
        vm.make_tuple([st.pop()])
    elif op == 0x86 or op == 0x87:  # TUPLE2, TUPLE3
        n = op - 0x84
        _underflow(vm, n)
        items = st[-n:]
        del st[-n:]
        vm.make_tuple(items)
    elif op == 0x52:  # REDUCE
        _underflow(vm, 2)
        args = st.pop()
        st[-1] = vm.reduce(st[-1], args)
    elif op == 0x62:  # BUILD
        _underflow(vm, 2)
        state = st.pop()
        obj = st[-1]
        st[-1] = result = vm.build(obj, state)
        vm.replace_pending(obj, result)
    elif op == 0x93:  # STACK_GLOBAL
        _underflow(vm, 2)
        name = st.pop()
        module = st.pop()
        if type(module) is not str or type(name) is not str:
            raise vm.fail("STACK_GLOBAL expects two strings")
        st.append(_lookup(vm, module, name))
    elif op == 0x4D:  # BININT2
        st.append(vm.unpack(_I2, "BININT2"))
    elif op == 0x65:  # APPENDS
        items = vm.pop_mark()
        vm.append_items(vm.top(), items)
    elif op == 0x61:  # APPEND
        item = vm.pop()
        vm.append_items(vm.top(), [item])
    elif op == 0x75:  # SETITEMS
        items = vm.pop_mark()
        vm.set_items(vm.top(), items)
    elif op == 0x73:  # SETITEM
        v = vm.pop()
        k = vm.pop()
        vm.set_items(vm.top(), [k, v])
    elif op == 0x5D:  # EMPTY_LIST (its _Meta is made when it is filled or placed)
        st.append([])
    elif op == 0x7D:  # EMPTY_DICT
        st.append({})
    elif op == 0x29:  # EMPTY_TUPLE
        vm.make_tuple([])
    elif op == 0x71:  # BINPUT
        vm.memo_put(vm.unpack(_I1, "BINPUT"))
    elif op == 0x72:  # LONG_BINPUT
        vm.memo_put(vm.unpack(_U4, "LONG_BINPUT"))
    elif op == 0x6A:  # LONG_BINGET
        vm.memo_get(vm.unpack(_U4, "LONG_BINGET"))
    elif op == 0x47:  # BINFLOAT
        st.append(vm.unpack(_F8, "BINFLOAT"))
    elif op == 0x58:  # BINUNICODE
        n = vm.unpack(_U4, "BINUNICODE")
        vm.push_str(_utf8(vm, vm.take(_str_len(vm, n), "string")))
    elif op == 0x8D:  # BINUNICODE8
        n = vm.unpack(_U8, "BINUNICODE8")
        vm.push_str(_utf8(vm, vm.take(_str_len(vm, n), "string")))
    elif op == 0x43:  # SHORT_BINBYTES
        st.append(vm.take(vm.byte("SHORT_BINBYTES"), "bytes"))
    elif op == 0x42:  # BINBYTES
        st.append(vm.take(vm.unpack(_U4, "BINBYTES"), "bytes"))
    elif op == 0x8E or op == 0x96:  # BINBYTES8, BYTEARRAY8: read-only views of the body
        st.append(vm.take(vm.unpack(_U8, "BINBYTES8"), "bytes"))
    elif op == 0x97:  # NEXT_BUFFER
        if vm.next_buffer >= len(vm.buffers):
            raise vm.fail(f"NEXT_BUFFER asks for buffer {vm.next_buffer}, the frame has {len(vm.buffers)}")
        st.append(vm.buffers[vm.next_buffer])
        vm.next_buffer += 1
    elif op == 0x98:  # READONLY_BUFFER
        if type(vm.top()) is not memoryview:
            raise vm.fail("READONLY_BUFFER on something that is not a buffer")
        st[-1] = st[-1].toreadonly()
    elif op == 0x8A or op == 0x8B:  # LONG1, LONG4
        n = vm.unpack(_I1, "LONG1") if op == 0x8A else vm.unpack(_I4, "LONG4")
        if n > _MAX_LONG_BYTES:
            raise vm.fail(f"integer of {n} bytes; at most {_MAX_LONG_BYTES} are allowed")
        st.append(int.from_bytes(vm.take(n, "LONG"), "little", signed=True))
    elif op == 0x63:  # GLOBAL (protocols 0-3)
        module = _line(vm)
        name = _line(vm)
        st.append(_lookup(vm, module, name))
    elif op == 0x30:  # POP
        vm.pop()
    elif op == 0x31:  # POP_MARK
        vm.pop_mark()
    elif op == 0x95:  # FRAME: the whole body is in memory, so only check the declared size
        n = vm.unpack(_U8, "FRAME")
        if n > vm.end - vm.pos:
            raise vm.fail(f"FRAME declares {n} bytes, {vm.end - vm.pos} present")
    elif op == 0x80:  # PROTO
        proto = vm.unpack(_I1, "PROTO")
        if not 2 <= proto <= 5:
            raise vm.fail(f"pickle protocol {proto} is not supported (2 to 5 are)")
    elif op == 0x2E:  # STOP
        if vm.marks or len(st) != 1:
            raise vm.fail("STOP with an unbalanced stack")
        vm.done = True
    else:
        name = _OPNAMES.get(op)
        if name is None:
            raise vm.fail(f"unknown opcode 0x{op:02x}")
        raise vm.fail(f"opcode {name} is not allowed")


def _str_len(vm: _Machine, n: int) -> int:
    if n > vm.limits.max_str_bytes:
        raise vm.fail(f"string of {n} bytes is over the {vm.limits.max_str_bytes}-byte limit")
    return n


def _utf8(vm: _Machine, raw: memoryview) -> str:
    try:
        return str(raw, "utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise vm.fail("string is not valid UTF-8") from None


def _line(vm: _Machine) -> str:
    window = bytes(vm.mv[vm.pos : min(vm.end, vm.pos + _MAX_GLOBAL_LINE)])
    i = window.find(b"\n")
    if i < 0:
        raise vm.fail("GLOBAL name is not terminated within 128 bytes")
    vm.pos += i + 1
    try:
        return window[:i].decode("ascii")
    except UnicodeDecodeError:
        raise vm.fail("GLOBAL name is not ASCII") from None


def _lookup(vm: _Machine, module: str, name: str) -> _Global:
    g = _GLOBALS.get((module, name))
    if g is None:
        raise vm.fail(f"global '{module}.{name}' is not allowed")
    return g


def safe_loads(data, *, start: int = 0, end: int | None = None, buffers=(), limits: Limits = DEFAULT_LIMITS) -> dict:
    """Decode the pickle in `data[start:end]` (which must end exactly at its STOP) into a str-keyed dict.

    `buffers` are the out-of-band buffers NEXT_BUFFER refers to, in order; all must be used.
    Arrays come back as read-only numpy views of `data` or of those buffers. Raises
    `ProtocolError` for anything outside the allowed subset or over `limits`.
    """
    mv = memoryview(data).cast("B")
    end = len(mv) if end is None else end
    if end - start > limits.max_body_bytes:
        raise ProtocolError(f"pickle of {end - start} bytes is over the {limits.max_body_bytes}-byte limit")
    if start >= end:
        raise ProtocolError("empty body: a pickle starts with PROTO (0x80)")
    vm = _Machine(mv, start, end, list(buffers), limits)
    try:
        result = _run(vm)
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise vm.fail(f"malformed pickle: {exc}") from None
    if vm.pos != end:
        raise ProtocolError(f"{end - vm.pos} trailing bytes after the pickle's STOP (at byte {vm.pos})")
    if vm.next_buffer != len(vm.buffers):
        raise ProtocolError(f"the frame carries {len(vm.buffers)} buffers, the pickle used {vm.next_buffer}")
    if type(result) is not dict:
        raise ProtocolError(f"the top-level value must be a dict with str keys, got {type(result).__name__}")
    return result
