"""The web stack's ceiling: a Flask app under Gunicorn with binserve's layout that answers from a
lookup table, with no model (`bench/serve_bench.py` runs it beside binserve).

    gunicorn -c bench/ceiling_app.py bench.ceiling_app:app

What a request costs here - Gunicorn's gthread worker, Flask's dispatch, `pickle.loads` of the body
and `pickle.dumps` of the reply - is what any Flask + Gunicorn server pays before its own code and
its model; binserve's own cost per request is measured against it. The table holds the embedding of
each benchmark text (random vectors of MiniLM's width: the client checks only that one came back).
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
from flask import Flask, Response, request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.texts import texts_25  # noqa: E402

_rng = np.random.default_rng(0)
TABLE = {t: _rng.standard_normal(384).astype(np.float32) for t in texts_25(256)}

app = Flask("ceiling")


@app.post("/infer")
def infer() -> Response:
    payload = pickle.loads(request.get_data())
    reply = {"embeddings": np.stack([TABLE[t] for t in payload["texts"]]), "status": "ok"}
    return Response(pickle.dumps(reply, protocol=5), content_type="application/octet-stream")


@app.get("/readyz")
def readyz() -> dict:
    return {"pid": os.getpid()}  # what tests/serverproc.py polls, as binserve's /readyz


# Gunicorn settings when this file is the config (-c): binserve's layout - its worker count and
# request threads, gthread - on the address the benchmark passes.
bind = [os.environ.get("CEILING_BIND", "127.0.0.1:8000")]
workers = int(os.environ.get("CEILING_WORKERS", "2"))
threads = int(os.environ.get("CEILING_THREADS", "64"))
worker_class = "gthread"
keepalive = 5
accesslog = None
