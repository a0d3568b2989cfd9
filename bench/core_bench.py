"""binserve's own cost per request, stage by stage, against issue 38's budgets; in one process.

    python -m bench.core_bench [--requests 5000]     (make bench-core)

A small request - one ~25-token text as a plain pickle-5 body, MiniLM's real tokenizer and adapter -
is timed through each stage of the request core alone (median of interleaved rounds of CPU time per
call; nothing else runs), then whole, through the WSGI app, with the engine's forward replaced by
its outputs so that what is timed is binserve's own code: the Flask app, the pipeline, the batch
thread and back. The same WSGI call of the web stack's ceiling (bench/ceiling_app.py) is its
floor. Gunicorn's own part (its parser, the sockets) is in `make bench-serve`, which measures the
server under load.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import statistics
import sys
import tempfile
import time

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="binserve-core-bench-"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.texts import texts_25  # noqa: E402
from binary_protocol import Limits, decode_body, encode_body  # noqa: E402

BUDGET_US = {
    "edge to context (Flask request context + hooks)": 30,
    "decode of the <= 1 KiB body": 30,
    "validate + tokenize (one text)": 60,
    "hand-off to the batch thread and back": 50,
    "split + join + encode + write": 50,
    "metrics and logs": 20,
}


def environ(body: bytes, path: str = "/infer") -> dict:
    return {
        "REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "bench", "wsgi.url_scheme": "http",
        "CONTENT_TYPE": "application/octet-stream", "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr, "wsgi.version": (1, 0), "wsgi.multithread": True, "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }  # fmt: skip


def wsgi_call(app, body: bytes) -> bytes:
    status = []
    out = app(environ(body), lambda s, h, e=None: status.append(s))
    try:
        data = b"".join(out)
    finally:
        getattr(out, "close", lambda: None)()
    if not status[0].startswith("200"):
        raise RuntimeError(f"{status[0]}: {data[:300]!r}")
    return data


def cpu_us(fn, items: list) -> float:
    """CPU time (all threads) per fn(item), in microseconds."""
    t0 = time.process_time()
    for it in items:
        fn(it)
    return (time.process_time() - t0) / len(items) * 1e6


def interleaved(stages: dict, rounds: int = 5) -> dict[str, float]:
    """Each stage's median over `rounds`, the stages taking turns in every round (so a burst of load
    on a shared machine hits all of them)."""
    per: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(rounds):
        for name, (fn, items) in stages.items():
            per[name].append(cpu_us(fn, items))
    return {name: statistics.median(values) for name, values in per.items()}


def wait_loaded(manager, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return manager.get(None)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # polling the background load, not waiting for a fixed time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="calls per round of each stage")
    args = ap.parse_args()
    n = args.requests

    from flask import Response

    from bench import ceiling_app
    from binserve.api.context import RequestContext
    from binserve.config import ServerConfig
    from binserve.observability import metrics
    from binserve.policy.gate import Policy
    from binserve.scheduling.batcher import Batcher
    from binserve.scheduling.contract import BatchSettings
    from server import create_app

    config = ServerConfig.from_env()
    app = create_app(config)
    loaded = wait_loaded(app.extensions["binserve"])
    adapter = loaded.adapter
    texts = texts_25(256)
    bodies = [pickle.dumps({"texts": [t]}, protocol=5) for t in texts]
    payloads = [{"texts": [t]} for t in texts]
    outputs = adapter.run_batch(adapter.validate({"texts": texts[:8]}).samples)
    answer = outputs[0]  # one row's real outputs: what the replaced forward answers every sample with
    limits = Limits()
    items = [bodies[i % 256] for i in range(n)]

    # 1. edge to context: the request context, routing and the before-request hooks, on a route with no body work
    def edge(body):
        with app.request_context(environ(body)):
            app.preprocess_request()

    # 2-3. decode; validate + tokenize
    def decode(body):
        decode_body(body, "application/octet-stream", limits)

    def validate(payload):
        adapter.validate(payload)

    # 4. hand-off: a real batcher (binserve's batch metrics) whose model answers at once
    batcher = Batcher(
        lambda samples: [answer] * len(samples),
        BatchSettings(max_batch_size=32),
        sample_len=len,
        name="core-bench",
        observer=metrics.BatchMetrics("core-bench"),
    )
    batcher.start()
    sample = adapter.validate(payloads[0]).samples

    def handoff(_):
        batcher.submit(sample, time.monotonic() + 10).result()

    # 5. split + join + encode + write (the reply's bytes through a WSGI response)
    host = {k: np.stack([o[k] for o in outputs[:1]]) for k in outputs[0]}

    def reply(_):
        one = adapter.join(adapter.split(host, 1), True)
        data, media = encode_body(one | {"status": "ok"}, "pickle")
        b"".join(Response(data, content_type=media)({"REQUEST_METHOD": "POST"}, lambda s, h, e=None: None))

    # 6. metrics and logs: everything a request writes to the metrics
    series = metrics.RequestSeries()
    queue = metrics.QUEUE_DURATION.labels(loaded.name)
    policy = Policy.from_config(config)

    def bookkeeping(_):
        ctx = RequestContext("0" * 32, time.monotonic())
        series.in_flight.inc()
        queue.observe(0.001)
        series.answered(ctx.labels, loaded.name, "native", 200, 0.004, 120, 1700, None)
        policy.count(ctx.admission)
        series.in_flight.dec()

    stages = {
        "edge to context (Flask request context + hooks)": (edge, items),
        "decode of the <= 1 KiB body": (decode, items),
        "validate + tokenize (one text)": (validate, [payloads[i % 256] for i in range(n)]),
        "hand-off to the batch thread and back": (handoff, items),
        "split + join + encode + write": (reply, items),
        "metrics and logs": (bookkeeping, items),
    }
    for fn, its in stages.values():  # warm-up
        for it in its[:200]:
            fn(it)
    measured = interleaved(stages)

    # whole: binserve's WSGI app with the forward replaced by its outputs, and the ceiling's
    adapter.run_batch = lambda samples: [answer] * len(samples)
    for b in items[:300]:
        wsgi_call(app, b)
        wsgi_call(ceiling_app.app, b)
    ends = interleaved({"whole": (lambda b: wsgi_call(app, b), items),
                        "floor": (lambda b: wsgi_call(ceiling_app.app, b), items)}, rounds=3)  # fmt: skip
    whole, floor = ends["whole"], ends["floor"]

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores ({cpu}); MiniLM, one ~25-token text per request, plain pickle-5 body")
    print("CPU time per request (us; median of interleaved rounds, all threads)\n")
    print("| stage | us | budget | |")
    print("|---|---:|---:|---|")
    for name, us in measured.items():
        budget = BUDGET_US[name]
        print(f"| {name} | {us:.1f} | {budget} | {'within' if us <= budget else 'OVER'} |")
    total = sum(measured.values())
    print(f"| **sum of the stages** | **{total:.1f}** | **{sum(BUDGET_US.values())}** | |")
    print(f"\nWhole request through the WSGI app (no Gunicorn), forward replaced by its outputs: {whole:.0f} us")
    print(f"The ceiling's WSGI app (Flask, pickle.loads + a lookup table): {floor:.0f} us")
    print(f"binserve's own in process: {whole - floor:.0f} us per request (target at c=32, with Gunicorn: <= 300)")
    batcher.close()
    os._exit(0)  # the model manager's threads are daemons of a process that is done


if __name__ == "__main__":
    main()
