"""The benchmark texts: MiniLM tokenizes each word of WORDS to one token, so a text's length in
tokens is known exactly. Kept free of torch, so the web-stack ceiling (ceiling_app.py) imports it cheaply."""

from __future__ import annotations

import numpy as np

WORDS = (
    "the quick brown fox jumps over a lazy dog while people watch from their house near the river "
    "and children play in the park after school on sunny days with friends and family"
).split()


def text_of(n_tokens: int, seed: int) -> str:
    """A text MiniLM tokenizes to exactly n_tokens (with [CLS] and [SEP]): one token per word."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=max(1, n_tokens - 2)))


def texts_25(n: int, offset: int = 0) -> list[str]:
    """n texts of 22-31 tokens (the issue's workload)."""
    return [text_of(22 + (i % 10), offset + i) for i in range(n)]
