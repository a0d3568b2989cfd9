"""Locust load test for binserve, speaking the framed binary protocol.

design: each simulated user holds one keep-alive connection (Locust's HttpUser session) and sends
bodies made by `binary_protocol.dict_to_binary`, the same encoder `request_tools` uses, then
decodes replies with the same safe decoder. Failures carry the server's error type and message.
Each user first asks `GET /models` what the default model takes, so the file runs unchanged against
any server (the Flask card's `locust -f locustfile.py --host ...` against a `--model-path` policy):
tasks, weighted, are texts and token ids when the default model takes texts, arrays of its declared
inputs when it takes arrays, and, when `BINSERVE_LOCUST_ARRAY_MODEL` names one (e.g. `policy`), that
array model as well.

    locust -f locustfile.py --host http://127.0.0.1:8000                 # web UI on :8089
    locust -f locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 60s

Payload sizes: BINSERVE_LOCUST_TEXTS (texts per request, default 1), BINSERVE_LOCUST_WORDS
(words per text, default 20), BINSERVE_LOCUST_ARRAY_BATCH (samples per array request, default 1).
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
from locust import HttpUser, between, task

from binary_protocol import FRAMED, MEDIA_TYPES, ProtocolError, binary_to_dict, dict_to_binary

TEXTS = int(os.environ.get("BINSERVE_LOCUST_TEXTS", "1"))
WORDS = int(os.environ.get("BINSERVE_LOCUST_WORDS", "20"))
ARRAY_MODEL = os.environ.get("BINSERVE_LOCUST_ARRAY_MODEL", "")
ARRAY_BATCH = int(os.environ.get("BINSERVE_LOCUST_ARRAY_BATCH", "1"))
VOCAB = "the a model serves many requests quickly while batches grow under load on every core".split()
HEADERS = {"Content-Type": MEDIA_TYPES[FRAMED], "Accept": MEDIA_TYPES[FRAMED]}


def _error_text(response) -> str:
    try:
        err = json.loads(response.content)["error"]
        return f"{response.status_code} {err['type']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:200]}"


class BinserveUser(HttpUser):
    """One client sending inference requests back to back (with a little think time)."""

    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        """What the default model takes (its inputs and outputs, from GET /models)."""
        self.takes_texts, self.default_arrays, self.default_output = True, None, "embeddings"
        self.array_inputs, self.array_output = None, "action"
        with self.client.get("/models", name="/models", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(_error_text(response))
                return
            listing = response.json()
            described = {m["name"]: m for m in listing["models"]}
        spec = described.get(listing["default"], {}).get("inputs") or {}
        self.takes_texts = "texts" in spec
        self.default_output = (spec.get("outputs") or ["embeddings"])[0]
        if not self.takes_texts:
            self.default_arrays = _array_inputs(spec)
        if ARRAY_MODEL and ARRAY_MODEL in described:
            array_spec = described[ARRAY_MODEL].get("inputs") or {}
            self.array_inputs = _array_inputs(array_spec)
            self.array_output = (array_spec.get("outputs") or ["action"])[0]

    def _infer(self, path: str, payload: dict, expect: str, name: str) -> None:
        with self.client.post(
            path, data=dict_to_binary(payload), headers=HEADERS, name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(_error_text(response))
                return
            try:
                outputs = binary_to_dict(response.content)
            except ProtocolError as exc:
                response.failure(f"undecodable reply: {exc}")
                return
            if expect not in outputs:
                response.failure(f"reply has {sorted(outputs)}, expected {expect!r}")

    @task(5)
    def texts(self) -> None:
        if not self.takes_texts:
            self._infer("/infer", _arrays(self.default_arrays), self.default_output, "arrays (default model)")
            return
        texts = [" ".join(random.choices(VOCAB, k=WORDS)) for _ in range(TEXTS)]
        self._infer("/infer", {"texts": texts}, self.default_output, "texts")

    @task(2)
    def token_ids(self) -> None:
        if not self.takes_texts:
            return
        ids = [[101, *random.choices(range(1000, 20000), k=WORDS), 102] for _ in range(TEXTS)]
        self._infer("/infer", {"input_ids": ids}, self.default_output, "token ids")

    @task(1)
    def arrays(self) -> None:
        if self.array_inputs:
            self._infer(f"/infer/{ARRAY_MODEL}", _arrays(self.array_inputs), self.array_output, "arrays")


def _array_inputs(spec: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The array inputs a model's GET /models entry declares: name -> (dtype, per-sample shape)."""
    return {
        name: (np.dtype(entry["dtype"]), tuple(entry["shape"]))
        for name, entry in spec.items()
        if isinstance(entry, dict) and "dtype" in entry and "shape" in entry
    }


def _arrays(inputs: dict) -> dict[str, np.ndarray]:
    """A batch of ARRAY_BATCH random samples of those inputs (integers over their range, or normal floats)."""
    rng = np.random.default_rng()
    out = {}
    for name, (dtype, shape) in inputs.items():
        size = (ARRAY_BATCH, *(d if d > 0 else 8 for d in shape))  # a variable dimension: 8
        if dtype.kind == "b":
            out[name] = rng.integers(0, 2, size).astype(dtype)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            out[name] = rng.integers(max(info.min, 0), min(info.max, 255), size, dtype=dtype, endpoint=True)
        else:
            out[name] = rng.standard_normal(size).astype(dtype)
    return out
