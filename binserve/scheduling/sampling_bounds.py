"""The range of every sampling value a generation request may set: one table that the adapter checks
requests against and the OpenAPI document states (binserve/api/spec/schemas.py).

design: a bound is data - a type and an interval - so the check, its 400 message and the schema are
all derived from it and cannot drift apart. Names are the native ones (`max_new_tokens`); the
OpenAI and seed routes map theirs onto them. `max_new_tokens` is bounded per model (its context),
so only its floor is here.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_STOPS = 4
MAX_STOP_CHARS = 64
#: the most alternatives per token a request may ask logprobs of (OpenAI's chat limit)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Bound:
    """A sampling value: an int, or a number (int or float); at least `low` (more than it when
    `low_open`) and at most `high`; None: unbounded on that side."""

    integer: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    #: said after the range in a refusal (what the value means at its edges)
    note: str = ""

    def holds(self, value) -> bool:
        if type(value) is not int and (self.integer or type(value) is not float):
            return False  # bool is not an int here, nor a str a number
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        """'a number in (0, 1]', 'an int >= 0': the refusal's words."""
        kind = "an int" if self.integer else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]{self.note}"

    def schema(self) -> dict:
        """The JSON Schema of the value."""
        out: dict = {"type": "integer" if self.integer else "number"}
        if self.low is not None:
            out["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            out["maximum"] = self.high
        return out


#: repetition_penalty is bounded both ways by the same factor: near 0 it multiplies logits past
#: float range (inf, NaN)
MIN_REPETITION_PENALTY = 0.1

BOUNDS: dict[str, Bound] = {
    "max_new_tokens": Bound(True, 1),
    "temperature": Bound(False, 0, 2),
    "top_p": Bound(False, 0, 1, low_open=True),
    "top_k": Bound(True, 0),
    "seed": Bound(True, 0, 2**63 - 1),
    "repetition_penalty": Bound(False, MIN_REPETITION_PENALTY, 1 / MIN_REPETITION_PENALTY, note=" (1: off)"),
    "presence_penalty": Bound(False, -2, 2, note=" (OpenAI's range; 0: off)"),
    "frequency_penalty": Bound(False, -2, 2, note=" (OpenAI's range; 0: off)"),
    "logprobs": Bound(True, 0, MAX_TOP_LOGPROBS, note=" (alternatives)"),
}


def schema(name: str) -> dict:
    """The JSON Schema of sampling value `name` (native name)."""
    return BOUNDS[name].schema()
