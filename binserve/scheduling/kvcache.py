"""The continuous batcher's KV cache: preallocated slots under a budget in tokens, written in place.

design: per layer one key and one value buffer of [slots, kv_heads, width, head_dim]. A running
sequence owns one slot (a row) and its tokens sit left-aligned in it, token i at column i, so a
step writes each row's new keys at that row's own column (one indexed write per layer) and hands
the attention a view of the used rows and columns: nothing is concatenated or re-padded per step.
Slots in use are always [0, used): a sequence that leaves has the last row moved into its slot
(a copy of that one row), so a decode step's rows are one contiguous view. The attention mask is
binserve's own 4D mask (row r's query at column c sees columns <= c), which Hugging Face models
take as given; positions are each row's own, so the rows need no common length.

Budget: `budget` tokens is the most the buffers ever hold: `slots x width <= budget`, with width
the longest reservation (prompt + max_new_tokens) among the rows, rounded up to a power-of-two
multiple of GRANULE. `fits` is what admission asks; the layout changes
(`reserve`: new buffers, the used rows copied) only when a longer reservation arrives, or when
the cache is empty and the next one is shorter. Buffers are zeroed when made: masked columns must hold finite
values (a NaN key would poison the softmax even where the mask hides it).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

#: the narrowest row, in tokens; rows widen by doubling
GRANULE = 16


def width_for(tokens: int, budget: int) -> int:
    """The row width that holds `tokens`: GRANULE x a power of two (so it changes rarely), at most
    the budget."""
    width = GRANULE
    while width < tokens:
        width *= 2
    return min(width, budget)


class SlotCache:
    """The KV cache of one generation loop; touched only by that loop's thread."""

    def __init__(self, budget: int, max_slots: int, device: torch.device) -> None:
        self.budget = budget
        self.max_slots = max_slots
        self.device = device
        self.width = 0  # columns per slot; 0 before the first reservation
        self.used = 0  # rows [0, used) are in use
        self.keys: list[torch.Tensor] = []  # per layer
        self.values: list[torch.Tensor] = []
        self._shapes: list[tuple] = []  # per layer (keys' and values' (heads, dim), dtype), from the first forward
        self._plan: _Plan | None = None
        self._view: _SlotView | None = None

    # --- bounds ---------------------------------------------------------------------------------
    def bound(self, budget: int, max_slots: int) -> None:
        """New bounds (settings changed): used by the next `fits` and layout."""
        self.budget, self.max_slots = budget, max_slots

    def slots(self, width: int) -> int:
        """How many rows a layout of `width` columns holds."""
        return min(self.max_slots, self.budget // width)

    def _next_width(self, longest: int) -> int:
        want = width_for(longest, self.budget)
        return max(want, self.width) if self.used else want

    def fits(self, rows: int, longest: int) -> bool:
        """Whether `rows` rows (those in use included), the longest reserving `longest` tokens, fit."""
        return longest <= self.budget and rows <= self.slots(self._next_width(longest))

    @property
    def allocated_tokens(self) -> int:
        """Tokens the buffers hold now (slots x width), whatever is in use."""
        return self.keys[0].shape[0] * self.width if self.keys else 0

    @torch.inference_mode()
    def reserve(self, longest: int) -> None:
        """Make the layout hold a row of `longest` tokens (after `fits` said yes): a wider layout
        copies the used rows over; an empty cache takes the narrowest layout that does."""
        width = self._next_width(longest)
        if width == self.width and self.keys and self.keys[0].shape[0] == self.slots(width):
            return
        old_keys, old_values, keep = self.keys, self.values, min(self.width, width)
        self.width = width
        self.keys, self.values = [], []  # the old buffers go before the new ones are made
        if not self._shapes:
            return  # made at the first write, with the shapes the model gives
        rows = self.slots(width)
        for layer, ((kshape, vshape), dtype) in enumerate(self._shapes):
            self.keys.append(torch.zeros(rows, kshape[0], width, kshape[1], dtype=dtype, device=self.device))
            self.values.append(torch.zeros(rows, vshape[0], width, vshape[1], dtype=dtype, device=self.device))
            if self.used and old_keys:
                self.keys[layer][: self.used, :, :keep] = old_keys[layer][: self.used, :, :keep]
                self.values[layer][: self.used, :, :keep] = old_values[layer][: self.used, :, :keep]

    # --- rows -----------------------------------------------------------------------------------
    def add(self, n: int) -> list[int]:
        """Take `n` more rows; their slots."""
        start = self.used
        self.used += n
        return list(range(start, self.used))

    @torch.inference_mode()
    def remove(self, gone: set[int], columns: int) -> dict[int, int]:
        """Free the slots in `gone`; the rows kept past the new end move into the freed slots (their
        first `columns` columns). Returns {old slot: new slot} of the rows that moved."""
        left = self.used - len(gone)
        holes = [s for s in sorted(gone) if s < left]
        movers = [s for s in range(left, self.used) if s not in gone]
        if holes and self.keys and columns:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            for k, v in zip(self.keys, self.values, strict=True):
                k[dst, :, :columns] = k[src, :, :columns]
                v[dst, :, :columns] = v[src, :, :columns]
        self.used = left  # an empty cache keeps its buffers: the next `reserve` narrows them if it can
        return dict(zip(movers, holes, strict=True))

    @torch.inference_mode()
    def copy_row(self, src: int, dst: int, columns: int) -> None:
        """Copy one row's first `columns` columns to another slot (choices sharing a prefill)."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :columns] = k[src, :, :columns]
            v[dst, :, :columns] = v[src, :, :columns]

    @torch.inference_mode()
    def read_row(self, slot: int, columns: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of one row's first `columns` columns, per layer (for the prefix store)."""
        pairs = zip(self.keys, self.values, strict=True)
        return [(k[slot, :, :columns].clone(), v[slot, :, :columns].clone()) for k, v in pairs]

    @torch.inference_mode()
    def write_row(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]], columns: int) -> bool:
        """Write a stored prefix into a row's first `columns` columns; False when the buffers are not
        made yet (before the first forward), so the caller computes it instead."""
        if not self.keys:
            return False
        for (k, v), (pk, pv) in zip(zip(self.keys, self.values, strict=True), kv, strict=True):
            k[slot, :, :columns] = pk[:, :columns]
            v[slot, :, :columns] = pv[:, :columns]
        return True

    # --- one forward ----------------------------------------------------------------------------
    def inputs(self, slots: list[int], starts: list[int], counts: list[int], attention: str):
        """Plan a forward that feeds row `slots[i]` `counts[i]` tokens from column `starts[i]` on
        (right-aligned in the step's `width` query positions, left padding first): returns the
        position ids [n, q] and the 4D attention mask [n, 1, q, kv] to pass the model, and makes
        `cache()` write and read accordingly."""
        q = max(counts)
        n = len(slots)
        dev = self.device
        start = torch.tensor(starts, device=dev)[:, None]
        offset = (q - torch.tensor(counts, device=dev))[:, None]
        j = torch.arange(q, device=dev)[None, :]
        columns = (start + j - offset).clamp(min=0)  # [n, q]: each query's column (padding: clamped)
        kv_len = max(s + c for s, c in zip(starts, counts, strict=True))
        seen = torch.arange(kv_len, device=dev)[None, None, :] <= columns[:, :, None]  # [n, q, kv]
        if attention in ("sdpa", "flash_attention_2", "flex_attention"):
            mask = seen[:, None]
        else:  # eager attention adds its mask to the scores
            low = torch.finfo(torch.float32).min
            mask = torch.zeros(seen.shape, device=dev).masked_fill(~seen, low)[:, None]
        real = j >= offset  # [n, q]: the row's own tokens (only those are written)
        contiguous = slots == list(range(slots[0], slots[0] + n))
        rows = torch.tensor(slots, device=dev)
        if q == 1:
            write = (rows, columns[:, 0], None)
        else:
            flat_rows = rows[:, None].expand(n, q)[real]
            write = (flat_rows, columns[real], real)
        self._plan = _Plan(write, rows, slots[0] if contiguous else None, n, kv_len, q)
        return columns, mask

    def cache(self) -> _SlotView:
        """The cache object the planned forward hands the model (one for the loop's lifetime: it
        holds no state of its own, the plan says what each forward writes and reads)."""
        if self._view is None:
            self._view = _SlotView(self)
        return self._view

    @torch.inference_mode()
    def _update(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        if len(self.keys) <= layer:  # the first forward: the model tells the shapes
            rows = self.slots(self.width)
            self.keys.append(key.new_zeros(rows, key.shape[1], self.width, key.shape[3]))
            self.values.append(value.new_zeros(rows, value.shape[1], self.width, value.shape[3]))
            self._shapes.append((((key.shape[1], key.shape[3]), (value.shape[1], value.shape[3])), key.dtype))
        k, v, p = self.keys[layer], self.values[layer], self._plan
        rows, cols, real = p.write
        if real is None:
            k[rows, :, cols] = key[:, :, 0]
            v[rows, :, cols] = value[:, :, 0]
        else:  # [n, heads, q, dim] -> the real tokens [N, heads, dim]
            k[rows, :, cols] = key.transpose(1, 2)[real]
            v[rows, :, cols] = value.transpose(1, 2)[real]
        if p.first is not None:
            return k[p.first : p.first + p.n, :, : p.kv_len], v[p.first : p.first + p.n, :, : p.kv_len]
        return k[p.rows, :, : p.kv_len], v[p.rows, :, : p.kv_len]


class _Plan:
    __slots__ = ("write", "rows", "first", "n", "kv_len", "past")

    def __init__(self, write, rows, first, n, kv_len, q) -> None:
        self.write, self.rows, self.first, self.n, self.kv_len = write, rows, first, n, kv_len
        self.past = kv_len - q  # what a model that asks takes as the tokens already seen


class _SlotLayer(CacheLayerMixin):
    """One layer of the cache as a Hugging Face model calls it."""

    is_sliding = False

    def __init__(self, cache: SlotCache, index: int) -> None:
        super().__init__()
        self._cache, self._index = cache, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self._cache._update(self._index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache._plan.kv_len, 0

    def get_seq_length(self) -> int:
        p = self._cache._plan
        return p.past if p is not None else 0

    def get_max_length(self) -> int:
        return self._cache.width


class _SlotView(Cache):
    """The `Cache` a model's forward writes to: its layers are views of the slot buffers."""

    def __init__(self, cache: SlotCache) -> None:
        self._slot_cache = cache
        super().__init__(layers=[])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(_SlotLayer(self._slot_cache, len(self.layers)))
        return self._slot_cache._update(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        p = self._slot_cache._plan
        return p.past if p is not None else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        return self._slot_cache._plan.kv_len, 0
