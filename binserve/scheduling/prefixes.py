"""Prompt prefixes whose KV a generation loop keeps, so a request that starts the same way (a shared
system prompt, a few-shot preamble, a conversation's earlier turns) skips computing it.

design: a prefix is kept per whole BLOCK of tokens. Each stored entry is the KV of one prompt's
longest block-aligned prefix (short of its last token, whose logits the prompt still has to
compute), and every block boundary of it is indexed by a digest of the tokens up to there: a
later prompt finds its longest indexed boundary by walking its own digests, so sharing the
first 192 tokens is enough, whatever follows. Digests are BLAKE2b of the token ids chained block
by block (a collision would hand one caller another's cache; Python's hash of ints is guessable).
Entries are evicted least recently used beyond `capacity` tokens; an entry is only stored when
it would add blocks the store does not already have. Only the loop's thread touches it. KV is
only valid for the weights it was computed with: the store lives and dies with its loop, which
a model version owns.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

#: tokens per block: the grain of sharing (vLLM's default block is 16 tokens too)
BLOCK = 16


def digests(tokens: list[int]) -> list[bytes]:
    """One digest per whole block of `tokens`: digest k covers tokens[: (k + 1) * BLOCK]."""
    out, prev = [], b""
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        prev = hashlib.blake2b(prev + array("q", tokens[end - BLOCK : end]).tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


class PrefixStore:
    """Block-aligned prompt prefixes and their per-layer KV, LRU within `capacity` tokens."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tokens = 0  # held now
        self._entries: OrderedDict[int, tuple[list, int, list[bytes]]] = OrderedDict()  # id -> (kv, length, digests)
        self._index: dict[bytes, int] = {}  # boundary digest -> entry id
        self._next = 0
        self.hits = 0
        self.reused_tokens = 0

    def usable(self, prompt: list[int]) -> int:
        """The longest prefix of `prompt` worth storing or finding: whole blocks, short of the
        last token."""
        return (len(prompt) - 1) // BLOCK * BLOCK if self.capacity else 0

    def find(self, prompt: list[int]) -> tuple[list | None, int]:
        """(per-layer KV, length) of the longest stored prefix of `prompt`; (None, 0) if none."""
        if not self._entries:
            return None, 0
        marks = digests(prompt[: self.usable(prompt)])
        for k in range(len(marks) - 1, -1, -1):
            entry = self._index.get(marks[k])
            if entry is not None:
                self._entries.move_to_end(entry)
                self.hits += 1
                self.reused_tokens += (k + 1) * BLOCK
                return self._entries[entry][0], (k + 1) * BLOCK
        return None, 0

    def wants(self, prompt: list[int], found: int) -> bool:
        """Whether storing this prompt's prefix adds anything beyond the `found` tokens it reused."""
        length = self.usable(prompt)
        return length > found and length <= self.capacity

    def add(self, prompt: list[int], kv: list) -> None:
        """Store `kv` (per layer, `usable(prompt)` tokens long) as this prompt's prefix."""
        length = self.usable(prompt)
        while self.tokens + length > self.capacity and self._entries:
            self._evict()
        entry, self._next = self._next, self._next + 1
        marks = digests(prompt[:length])
        self._entries[entry] = (kv, length, marks)
        self.tokens += length
        for mark in marks:
            self._index[mark] = entry  # the newest entry serves a boundary several share

    def _evict(self) -> None:
        entry, (_, length, marks) = self._entries.popitem(last=False)
        self.tokens -= length
        for mark in marks:
            if self._index.get(mark) == entry:
                del self._index[mark]
        # a boundary the evicted entry served may still be in a newer one: index it there again
        for other, (_, _, theirs) in self._entries.items():
            for mark in theirs:
                self._index.setdefault(mark, other)

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.tokens = 0
