"""What a request becomes once an adapter has checked it, and how an adapter describes its inputs.

design: these are the adapter contract's values that cross into the HTTP layer (a route reads a
model's `TensorSpec`s to describe it, the pipeline carries a `Validated` from `validate` to
`submit` and `join`), so they live apart from `base.py` and import neither torch nor
transformers: the HTTP layer can name them without loading a model's stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Validated:
    """A request checked against the model: its samples, and whether the reply keeps a batch axis."""

    samples: list
    batched: bool
    #: per-request reply options the adapter parsed (e.g. a classifier's top_k and threshold)
    options: dict = dataclasses.field(default_factory=dict)
    #: seconds the adapter spent on named steps of `validate` (Server-Timing shows them: `decode-image`)
    timing: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    """One input a model takes, per sample: numpy dtype (None: text, or an encoded image) and shape (-1: any size)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int, ...]
    #: "image" for an encoded image (JPEG, PNG, WebP bytes; base64 in JSON); None otherwise
    encoding: str | None = None
