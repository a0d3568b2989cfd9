"""Locust load test for binserve, speaking the framed binary protocol.

design: each simulated user holds one keep-alive connection (Locust's HttpUser session) and sends
bodies made by `binary_protocol.dict_to_binary`, the same encoder `request_tools` uses, then
decodes replies with the same safe decoder. Failures carry the server's error type and message.
Tasks, weighted: texts (default model), token ids (default model) and, when
`BINSERVE_LOCUST_ARRAY_MODEL` names one (e.g. `policy`), the array model.

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
        texts = [" ".join(random.choices(VOCAB, k=WORDS)) for _ in range(TEXTS)]
        self._infer("/infer", {"texts": texts}, "embeddings", "texts")

    @task(2)
    def token_ids(self) -> None:
        ids = [[101, *random.choices(range(1000, 20000), k=WORDS), 102] for _ in range(TEXTS)]
        self._infer("/infer", {"input_ids": ids}, "embeddings", "token ids")

    @task(1)
    def arrays(self) -> None:
        if not ARRAY_MODEL:
            return
        rng = np.random.default_rng()
        payload = {
            "image": rng.integers(0, 255, (ARRAY_BATCH, 480, 640, 3), dtype=np.uint8),
            "state": rng.standard_normal((ARRAY_BATCH, 6)).astype(np.float32),
        }
        self._infer(f"/infer/{ARRAY_MODEL}", payload, "action", "arrays")
