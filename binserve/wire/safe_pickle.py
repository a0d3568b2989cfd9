"""A pickle decoder that is safe on hostile bytes, bounded in what it produces, and zero-copy for arrays.

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
* what decoding *produces* is budgeted, not only what it reads: containers are sealed once placed
  inside another, so each container's height, visited items and produced bytes (a memoized string,
  bytes or array counts once per reference, because the server copies it once per reference when
  it tokenizes or stacks) are exact when it is placed; an array's size counts its empty dimensions
  as 1, so a zero-byte array of shape (2**59, 0) is as large as it will be to whoever iterates it.
  The budget is a small multiple of the body, with an absolute cap (`Limits.budget`);
* the memo, the mark stack and the number of opcodes are bounded, the last one relative to what
  the body produces, so a body of do-nothing opcodes cannot hold the interpreter (and the GIL);
* strings are strict UTF-8: a lone surrogate is refused here rather than crashing a tokenizer.

Size limits raise `LimitExceeded` (413); everything else `ProtocolError` (400); both are
`ProtocolError`s. The numpy side (allowed globals, argument checks, reconstruction) is
`pickle_numpy`; this module is the machine: opcodes, stack, memo, containers and limits. The
dispatch loop handles the hot opcodes inline on local variables: this file is the server's
per-request decode cost for plain pickle bodies (bench/protocol.py measures it).
"""

from __future__ import annotations

import pickletools
import struct
from dataclasses import dataclass

import numpy as np

from binserve.errors import LimitExceeded, ProtocolError
from binserve.wire.pickle_numpy import (
    DTYPE_CODES,
    DTYPE_RUN_OPS,
    G_DTYPE,
    Global,
    Pending,
    build,
    lookup,
    reduce,
    virtual_bytes,
)
from binserve.wire.pickle_numpy import dtype_run as _dtype_run

__all__ = ["DTYPE_CODES", "Limits", "LimitExceeded", "ProtocolError", "safe_loads"]

_MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Bounds applied while decoding a request body (sizes in bytes)."""

    max_body_bytes: int = 256 * _MiB
    #: JSON bodies are parsed by `json.loads` before anything can be checked, and a JSON byte can
    #: become ~25 bytes of Python objects (`[],`), so JSON gets its own, smaller limit
    max_json_bytes: int = 4 * _MiB
    max_depth: int = 32
    max_items: int = 4 * 1024 * 1024  # a 480x640x3 image as JSON lists is 1.2M items
    max_str_bytes: int = 16 * _MiB
    max_array_dims: int = 32
    max_array_bytes: int = 256 * _MiB
    max_buffers: int = 1024
    # CPython's pickler batches APPENDS/SETITEMS by 1000, so real payloads keep a few thousand
    # items on the VM's stack at most; a flood of objects that are never nested stops here.
    max_stack: int = 4096
    #: memo entries: a real pickle memoizes each distinct str/tuple/list/dict/array once
    max_memo: int = 1 << 18
    #: opcodes per body, absolute (~0.3 s of interpreter time here): bulk data travels as arrays
    max_opcodes: int = 1 << 20
    #: opcodes allowed before the body has produced anything; past it, one per 2 produced bytes
    free_opcodes: int = 1 << 16
    #: what decoding may produce: decode_base_bytes + decode_ratio x body, at most max_decoded_bytes
    decode_base_bytes: int = 16 * _MiB
    decode_ratio: int = 4
    max_decoded_bytes: int = 256 * _MiB

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")

    def budget(self, body_bytes: int) -> int:
        """Bytes that decoding a body of `body_bytes` may produce (aliases counted per reference)."""
        return min(self.max_decoded_bytes, self.decode_base_bytes + self.decode_ratio * body_bytes)


DEFAULT_LIMITS = Limits()

_MAX_LONG_BYTES = 32  # ints wider than 256 bits are not token ids or shapes; refuse them
_MAX_GLOBAL_LINE = 128
_CHECK_EVERY = 1024  # opcodes between checks of the stack size and the opcode allowance

# Produced bytes charged per leaf, near CPython's object sizes (a pointer for shared singletons).
_LEAF_COST = {type(None): 8, bool: 8, int: 32, float: 24}
_STR_BASE = 56
_BYTES_BASE = 40
_ARRAY_BASE = 112


class _Meta:
    """What the VM knows of a container it built: height, visited items, produced bytes, sealed."""

    __slots__ = ("obj", "height", "weight", "cost", "sealed", "flags")

    def __init__(self, obj, height: int, weight: int, cost: int, flags: int) -> None:
        self.obj = obj  # keeps the object alive, so its id() stays unique while decoding
        self.height = height
        self.weight = weight
        self.cost = cost
        self.sealed = False
        self.flags = flags  # _RAW / _OPAQUE: what sits somewhere below


_RAW = 1  # a memoryview (bytes payload) sits below: give it its own bytes when it becomes a value
_OPAQUE = 2  # numpy internals (dtype, global) sit below: fine as REDUCE arguments, never as a value
_NONE_TYPE = type(None)
_SCALAR_TYPES = (bool, int, float, _NONE_TYPE)
_OPNAMES = {ord(op.code): op.name for op in pickletools.opcodes if len(op.code) == 1}


def _str_cost(s: str) -> int:
    # isascii() is O(1) in CPython; other strings may take up to 4 bytes per character
    return _STR_BASE + (len(s) if s.isascii() else 4 * len(s))


def _array_cost(arr: np.ndarray) -> int:
    return _ARRAY_BASE + (arr.nbytes or virtual_bytes(arr.shape, arr.dtype.itemsize))


class _Machine:
    """One decode: the stack, memo, marks and limit accounting over one memoryview."""

    __slots__ = (
        "mv",
        "pos",
        "end",
        "buffers",
        "next_buffer",
        "limits",
        "budget",
        "produced",
        "stack",
        "marks",
        "memo",
        "meta",
        "op_pos",
    )

    def __init__(self, mv: memoryview, start: int, end: int, buffers, limits: Limits) -> None:
        self.mv = mv
        self.pos = start
        self.end = end
        self.buffers = buffers
        self.next_buffer = 0
        self.limits = limits
        self.budget = limits.budget(end - start + sum(len(b) for b in buffers))
        self.produced = 0  # bytes placed into containers so far (for the opcode allowance)
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.meta: dict[int, _Meta] = {}
        self.op_pos = start

    # --- errors --------------------------------------------------------------------------
    def fail(self, message: str) -> ProtocolError:
        return ProtocolError(f"{message} (at byte {self.op_pos})")

    def too_large(self, message: str) -> LimitExceeded:
        return LimitExceeded(f"{message} (at byte {self.op_pos})")

    def where(self) -> str:
        """ " 'key'" for the dict key whose value is being decoded, worked out from the stack.

        Only error paths call this, so the hot loop keeps no key bookkeeping. The innermost dict
        on the stack is the one being filled: after a MARK its items alternate key, value (the
        last key at an even offset is the current one); without one (SETITEM) the key follows it.
        """
        st = self.stack
        marks = set(self.marks)
        for i in range(len(st) - 1, -1, -1):
            if type(st[i]) is not dict:
                continue
            if i + 1 in marks:
                stop = min((m for m in marks if m > i + 1), default=len(st))
                region = st[i + 1 : stop]
                key = region[((len(region) - 1) // 2) * 2] if region else None
            else:
                key = st[i + 1] if i + 1 < len(st) else None
            return f" {key!r}" if type(key) is str else ""
        return ""

    # --- reading -------------------------------------------------------------------------
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

    def text(self, raw: memoryview) -> str:
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"a string in{self.where() or ' the body'} is not valid UTF-8") from None

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

    def underflow(self, need: int) -> None:
        if len(self.stack) - (self.marks[-1] if self.marks else 0) < need:
            raise self.fail("stack underflow")

    # --- containers and limits -----------------------------------------------------------
    def new_container(self, obj, height: int = 1, weight: int = 0, cost: int = 64, flags: int = 0) -> _Meta:
        m = self.meta[id(obj)] = _Meta(obj, height, weight, cost, flags)
        return m

    def child(self, item, into: _Meta | None):
        """Check `item` may go into `into` (None: a tuple) and seal it.

        Returns (height, weight, cost, flags). flags: _RAW when a bytes payload (memoryview) sits
        below, _OPAQUE when numpy internals (dtypes, globals) do. Tuples may hold internals, since
        REDUCE/BUILD take their arguments as tuples; lists and dicts - the payload - may not.
        """
        t = type(item)
        if t is str:
            return 0, 1, _str_cost(item), 0
        cost = _LEAF_COST.get(t)
        if cost is not None:
            return 0, 1, cost, 0
        if t is np.ndarray:
            return 0, 1, _array_cost(item), 0
        if t is memoryview:
            return 0, 1, _BYTES_BASE + len(item), _RAW
        if t is bytes:
            return 0, 1, _BYTES_BASE + len(item), 0
        m = self.meta.get(id(item))
        if m is not None:
            if m is into:
                raise self.fail("a container may not contain itself")
            if into is not None and m.flags & _OPAQUE:
                raise self.fail("a tuple of numpy internals used as a value")
            m.sealed = True
            return m.height, m.weight + 1, m.cost + 8, m.flags
        if t is tuple:  # a tuple of leaves only (make_tuple keeps no _Meta for those)
            flags = 0
            cost = 64
            for x in item:
                tx = type(x)
                if tx is str:
                    cost += _str_cost(x)
                elif tx in _LEAF_COST:
                    cost += _LEAF_COST[tx]
                elif tx is memoryview:
                    flags |= _RAW
                    cost += _BYTES_BASE + len(x)
                elif tx is np.ndarray:
                    cost += _array_cost(x)
                elif tx is bytes or isinstance(x, np.generic):
                    cost += 64 + (len(x) if tx is bytes else 0)
                else:
                    flags |= _OPAQUE
            if into is not None and flags & _OPAQUE:
                raise self.fail("a tuple of numpy internals used as a value")
            if flags & _RAW:
                self.new_container(item, 1, len(item), cost, flags)  # so that materialize() finds it
            return 1, len(item) + 1, cost + 8, flags
        if t is list or t is dict:  # still empty: its _Meta is made now, sealed
            self.new_container(item).sealed = True
            return 1, 1, 72, 0
        if isinstance(item, np.generic):
            return 0, 1, 64, 0
        if into is None:
            return 0, 1, 8, _OPAQUE
        if t is Global:
            raise self.fail(f"global '{item.name}' used as a value")
        if t is Pending:
            raise self.fail("numpy object used before its state was set (missing BUILD)")
        if isinstance(item, np.dtype):
            raise self.fail("a numpy dtype is not a supported value; send an array")
        raise self.fail(f"value of type {t.__name__} is not supported")

    def check_growth(self, height: int, weight: int, cost: int) -> None:
        lim = self.limits
        if height > lim.max_depth:
            raise self.fail(f"nesting deeper than {lim.max_depth} levels")
        if weight > lim.max_items:
            raise self.too_large(f"more than {lim.max_items} items (aliases counted on every visit)")
        if cost > self.budget:
            raise self.too_large(
                f"the body decodes into more than {self.budget} bytes{self.where() and ' at' + self.where()} (each "
                f"reference to a repeated string, bytes or array counted; the limit is "
                f"{lim.decode_ratio}x the body + {lim.decode_base_bytes} bytes, at most {lim.max_decoded_bytes})"
            )

    def target(self, obj, kind: type) -> _Meta:
        if type(obj) is not kind:
            raise self.fail(f"expected a {kind.__name__} to add items to, got {type(obj).__name__}")
        m = self.meta.get(id(obj))
        if m is None:
            m = self.new_container(obj)
        elif m.sealed:
            raise self.fail(f"{kind.__name__} modified after it was placed in another container")
        return m

    def measure(self, items, into: _Meta | None, step: int = 1) -> tuple[int, int, int, int]:
        """Height, weight, cost and flags of `items[::step]` placed into `into`."""
        height = weight = cost = flags = 0
        for i in range(0, len(items), step):
            h, w, c, f = self.child(items[i], into)
            if h > height:
                height = h
            weight += w
            cost += c
            flags |= f
        return height, weight, cost, flags

    def materialize(self, item):
        """Give bytes payloads stored as values their own bytes (they are not array data)."""
        if type(item) is memoryview:
            return bytes(item)
        m = self.meta.get(id(item)) if type(item) is tuple else None
        if m is None or not m.flags & _RAW:
            return item  # lists and dicts were materialized as their items went in
        out = tuple(self.materialize(x) for x in item)
        self.new_container(out, m.height, m.weight, m.cost)
        return out

    def make_tuple(self, items: list) -> tuple:
        meta = self.meta
        for x in items:
            tx = type(x)
            if tx is tuple or tx is list or tx is dict or id(x) in meta:
                break
        else:
            # Only leaves (scalars, buffers, arrays, numpy internals): the usual REDUCE argument
            # tuple. Tuples are immutable, so child() can work out its flags if it is ever placed.
            return tuple(items)
        t = tuple(items)
        height, weight, cost, flags = self.measure(items, None)
        self.check_growth(height + 1, weight, cost)
        self.produced += cost
        self.new_container(t, height + 1, weight, cost + 64, flags)
        return t

    def append_items(self, lst, items: list) -> None:
        m = self.target(lst, list)
        height, weight, cost, flags = self.measure(items, m)
        # checked before any bytes payload is copied out of the body
        self.check_growth(max(m.height, height + 1), m.weight + weight, m.cost + cost)
        if flags:
            items = [self.materialize(x) for x in items]
        lst.extend(items)
        m.height = max(m.height, height + 1)
        m.weight += weight
        m.cost += cost
        self.produced += cost

    def set_items(self, d, items: list) -> None:
        if len(items) % 2:
            raise self.fail("SETITEMS with an odd number of items")
        m = self.target(d, dict)
        for i in range(0, len(items), 2):
            if type(items[i]) is not str:
                raise self.fail(f"dict key of type {type(items[i]).__name__}; keys must be str")
        height, weight, cost, flags = self.measure(items[1::2], m)
        keys = sum(_str_cost(items[i]) for i in range(0, len(items), 2))
        n = len(items) // 2
        self.check_growth(max(m.height, height + 1), m.weight + weight + n, m.cost + cost + keys)
        for i in range(0, len(items), 2):
            v = items[i + 1]
            d[items[i]] = self.materialize(v) if flags else v
        m.height = max(m.height, height + 1)
        m.weight += weight + n
        m.cost += cost + keys
        self.produced += cost + keys

    def memo_get(self, key: int) -> None:
        try:
            obj = self.memo[key]
        except KeyError:
            raise self.fail(f"memo key {key} was never stored") from None
        if type(obj) is Pending and obj.result is not None:
            obj = obj.result
        self.stack.append(obj)

    def memo_put(self, key: int) -> None:
        if len(self.memo) >= self.limits.max_memo and key not in self.memo:
            raise self.too_large(f"more than {self.limits.max_memo} memo entries")
        self.memo[key] = self.top()

    def opcode_allowance(self, ops: int) -> int:
        """The next opcode count to check at; raises once the body ran more than it may.

        The dispatch loop calls this every `_CHECK_EVERY` opcodes at least, which is also when the
        stack's size is checked: cheaper than a check per opcode, and the stack can overshoot its
        limit by that many items only.
        """
        lim = self.limits
        if len(self.stack) > lim.max_stack:
            raise self.fail(f"more than {lim.max_stack} items on the stack")
        allowed = min(lim.max_opcodes, lim.free_opcodes + self.produced // 2)
        if ops > allowed:
            if allowed == lim.max_opcodes:
                raise self.too_large(
                    f"more than {lim.max_opcodes} pickle opcodes; send bulk data as numpy arrays (the framed "
                    "format that request_tools sends carries them without decoding)"
                )
            raise self.too_large(f"{ops} pickle opcodes produced only {self.produced} bytes of values")
        return min(allowed, ops + _CHECK_EVERY)


_I1 = struct.Struct("<B")
_I2 = struct.Struct("<H")
_I4 = struct.Struct("<i")
_U4 = struct.Struct("<I")
_U8 = struct.Struct("<Q")
_F8 = struct.Struct(">d")


def _run(vm: _Machine):  # noqa: C901 - one flat dispatch loop is the fastest pure-Python VM
    mv = vm.mv
    st = vm.stack
    memo = vm.memo
    marks = vm.marks
    end = vm.end
    max_stack = vm.limits.max_stack  # also bounds open MARKs
    max_memo = vm.limits.max_memo
    i4 = _I4.unpack_from
    pos = vm.pos
    ops = 0
    op_check = vm.opcode_allowance(0)
    while True:
        if pos >= end:
            vm.op_pos = pos
            raise vm.fail("pickle data was truncated (no STOP opcode)")
        op = mv[pos]
        pos += 1
        ops += 1
        if ops > op_check:
            vm.op_pos = pos - 1
            op_check = vm.opcode_allowance(ops)
        # The hottest opcodes of numpy's and dicts' pickles, handled on locals only, most frequent first.
        if op == 0x94:  # MEMOIZE
            n = len(memo)
            if n >= max_memo or not st:
                vm.op_pos = pos - 1
                if not st:
                    raise vm.fail("MEMOIZE on an empty stack")
                raise vm.too_large(f"more than {max_memo} memo entries")
            memo[n] = st[-1]
            continue
        if op == 0x8C:  # SHORT_BINUNICODE
            if pos >= end or pos + 1 + mv[pos] > end:
                vm.op_pos = pos - 1
                raise vm.fail("SHORT_BINUNICODE is truncated")
            n = mv[pos]
            try:
                st.append(str(mv[pos + 1 : pos + 1 + n], "utf-8"))
            except UnicodeDecodeError:
                vm.op_pos = pos - 1
                raise vm.fail(f"a string in{vm.where() or ' the body'} is not valid UTF-8") from None
            pos += 1 + n
        elif op == 0x28:  # MARK
            if len(marks) >= max_stack:
                vm.op_pos = pos - 1
                raise vm.fail(f"more than {max_stack} open MARKs")
            marks.append(len(st))
            continue
        elif op == 0x4B:  # BININT1
            if pos >= end:
                vm.op_pos = pos - 1
                raise vm.fail("BININT1 is truncated")
            st.append(mv[pos])
            pos += 1
        elif op == 0x4E:  # NONE
            st.append(None)
        elif op == 0x4A:  # BININT
            if pos + 4 > end:
                vm.op_pos = pos - 1
                raise vm.fail("BININT is truncated")
            st.append(i4(mv, pos)[0])
            pos += 4
        elif op == 0x68:  # BINGET
            if pos >= end:
                vm.op_pos = pos - 1
                raise vm.fail("BINGET is truncated")
            obj = memo.get(mv[pos])
            if obj is None or type(obj) is Pending:
                vm.op_pos = pos - 1
                vm.memo_get(mv[pos])
                pos += 1
            elif obj is G_DTYPE:
                st.append(obj)
                pos += 1
                after = _dtype_run(vm, pos)
                if after > 0:
                    pos = after
                    ops += DTYPE_RUN_OPS
            else:
                st.append(obj)
                pos += 1
        elif op == 0x87 or op == 0x86 or op == 0x85:  # TUPLE3, TUPLE2, TUPLE1
            n = op - 0x84
            if len(st) - (marks[-1] if marks else 0) < n:
                vm.op_pos = pos - 1
                raise vm.fail("stack underflow")
            items = st[-n:]
            del st[-n:]
            vm.op_pos = pos - 1
            st.append(vm.make_tuple(items))
        elif op == 0x88:  # NEWTRUE
            st.append(True)
        elif op == 0x89:  # NEWFALSE
            st.append(False)
        elif op == 0x74:  # TUPLE
            if not marks:
                vm.op_pos = pos - 1
                raise vm.fail("MARK expected but none is open")
            m = marks.pop()
            items = st[m:]
            del st[m:]
            vm.op_pos = pos - 1
            st.append(vm.make_tuple(items))
        elif op == 0x52:  # REDUCE
            vm.op_pos = pos - 1
            vm.underflow(2)
            args = st.pop()
            st[-1] = reduce(vm, st[-1], args)
        else:
            # Everything else goes through the machine's methods, which read vm.pos and name
            # vm.op_pos in their errors.
            vm.op_pos = pos - 1
            vm.pos = pos
            if _slow_op(vm, op):
                return st[0]
            pos = vm.pos


def _slow_op(vm: _Machine, op: int) -> bool:  # noqa: C901 - one flat dispatch
    """Run one opcode outside the hot set; True on STOP."""
    st = vm.stack
    if op == 0x62:  # BUILD
        vm.underflow(2)
        state = st.pop()
        st[-1] = build(vm, st[-1], state)
    elif op == 0x93:  # STACK_GLOBAL
        vm.underflow(2)
        name = st.pop()
        module = st.pop()
        if type(module) is not str or type(name) is not str:
            raise vm.fail("STACK_GLOBAL expects two strings")
        g = lookup(vm, module, name)
        st.append(g)
        if g is G_DTYPE:
            after = _dtype_run(vm, vm.pos)
            if after > 0:
                vm.pos = after
    elif op == 0x4D:  # BININT2
        st.append(vm.unpack(_I2, "BININT2"))
    elif op == 0x75:  # SETITEMS
        items = vm.pop_mark()
        vm.set_items(vm.top(), items)
    elif op == 0x73:  # SETITEM
        v = vm.pop()
        k = vm.pop()
        vm.set_items(vm.top(), [k, v])
    elif op == 0x65:  # APPENDS
        items = vm.pop_mark()
        vm.append_items(vm.top(), items)
    elif op == 0x61:  # APPEND
        item = vm.pop()
        vm.append_items(vm.top(), [item])
    elif op == 0x5D:  # EMPTY_LIST (its _Meta is made when it is filled or placed)
        st.append([])
    elif op == 0x7D:  # EMPTY_DICT
        st.append({})
    elif op == 0x29:  # EMPTY_TUPLE
        st.append(())
    elif op == 0x95:  # FRAME: the whole body is in memory, so only check the declared size
        n = vm.unpack(_U8, "FRAME")
        if n > vm.end - vm.pos:
            raise vm.fail(f"FRAME declares {n} bytes, {vm.end - vm.pos} present")
    elif op == 0x8E or op == 0x96:  # BINBYTES8, BYTEARRAY8: read-only views of the body
        st.append(vm.take(vm.unpack(_U8, "BINBYTES8"), "bytes"))
    elif op == 0x43:  # SHORT_BINBYTES
        st.append(vm.take(vm.byte("SHORT_BINBYTES"), "bytes"))
    elif op == 0x42:  # BINBYTES
        st.append(vm.take(vm.unpack(_U4, "BINBYTES"), "bytes"))
    elif op == 0x97:  # NEXT_BUFFER
        if vm.next_buffer >= len(vm.buffers):
            raise vm.fail(f"NEXT_BUFFER asks for buffer {vm.next_buffer}, the frame has {len(vm.buffers)}")
        st.append(vm.buffers[vm.next_buffer])
        vm.next_buffer += 1
    elif op == 0x98:  # READONLY_BUFFER
        if type(vm.top()) is not memoryview:
            raise vm.fail("READONLY_BUFFER on something that is not a buffer")
        st[-1] = st[-1].toreadonly()
    elif op == 0x71:  # BINPUT
        vm.memo_put(vm.unpack(_I1, "BINPUT"))
    elif op == 0x72:  # LONG_BINPUT
        vm.memo_put(vm.unpack(_U4, "LONG_BINPUT"))
    elif op == 0x6A:  # LONG_BINGET
        vm.memo_get(vm.unpack(_U4, "LONG_BINGET"))
    elif op == 0x47:  # BINFLOAT
        st.append(vm.unpack(_F8, "BINFLOAT"))
    elif op == 0x58:  # BINUNICODE
        st.append(vm.text(vm.take(_str_len(vm, vm.unpack(_U4, "BINUNICODE")), "string")))
    elif op == 0x8D:  # BINUNICODE8
        st.append(vm.text(vm.take(_str_len(vm, vm.unpack(_U8, "BINUNICODE8")), "string")))
    elif op == 0x8A or op == 0x8B:  # LONG1, LONG4
        n = vm.unpack(_I1, "LONG1") if op == 0x8A else vm.unpack(_I4, "LONG4")
        if n > _MAX_LONG_BYTES:
            raise vm.fail(f"integer of {n} bytes; at most {_MAX_LONG_BYTES} are allowed")
        st.append(int.from_bytes(vm.take(n, "LONG"), "little", signed=True))
    elif op == 0x63:  # GLOBAL (protocols 0-3)
        module = _line(vm)
        name = _line(vm)
        st.append(lookup(vm, module, name))
    elif op == 0x30:  # POP
        vm.pop()
    elif op == 0x31:  # POP_MARK
        vm.pop_mark()
    elif op == 0x80:  # PROTO
        proto = vm.unpack(_I1, "PROTO")
        if not 2 <= proto <= 5:
            raise vm.fail(f"pickle protocol {proto} is not supported (2 to 5 are)")
    elif op == 0x2E:  # STOP
        if vm.marks or len(st) != 1:
            raise vm.fail("STOP with an unbalanced stack")
        return True
    else:
        name = _OPNAMES.get(op)
        if name is None:
            raise vm.fail(f"unknown opcode 0x{op:02x}")
        raise vm.fail(f"opcode {name} is not allowed")
    return False


def _str_len(vm: _Machine, n: int) -> int:
    if n > vm.limits.max_str_bytes:
        raise vm.too_large(f"string of {n} bytes is over the {vm.limits.max_str_bytes}-byte limit")
    return n


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


def safe_loads(data, *, start: int = 0, end: int | None = None, buffers=(), limits: Limits = DEFAULT_LIMITS) -> dict:
    """Decode the pickle in `data[start:end]` (which must end exactly at its STOP) into a str-keyed dict.

    `buffers` are the out-of-band buffers NEXT_BUFFER refers to, in order; all must be used.
    Arrays come back as read-only numpy views of `data` or of those buffers. Raises
    `ProtocolError` for anything outside the allowed subset, `LimitExceeded` for anything over `limits`.
    """
    mv = memoryview(data).cast("B")
    end = len(mv) if end is None else end
    if end - start > limits.max_body_bytes:
        raise LimitExceeded(f"pickle of {end - start} bytes is over the {limits.max_body_bytes}-byte limit")
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
