"""Fan-out benchmark: three models, each request needing a random non-empty subset of them.

Run: `make bench-fanout` (= `.venv/bin/python -m bench.fanout_bench`). binserve serves MiniLM
(embeddings) and two classifiers built from MiniLM's encoder with seeded heads
(models/examples/classifier.py: topics, single-label; toxicity, multi-label), all on their default
runtimes. One ~25-token text per logical request, and a random non-empty subset of the three
models (seeded), at concurrency 32, two ways: (a) fan-out, one request naming its models;
(b) what a client does without it, one request per model of the subset, one after the other.
Printed: logical requests per second, latency, forward passes (batches, over all models, from
/metrics) per logical request, and HTTP requests per logical request.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.serve_bench import RawClient, run_clients  # noqa: E402
from bench.texts import texts_25  # noqa: E402
from binary_protocol import FRAMED, MEDIA_TYPES, dict_to_binary  # noqa: E402
from models.examples.classifier import TOPICS, TOXICITY, write_classifier  # noqa: E402
from models.registry import default_minilm_path  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

MODELS = ("minilm", "topics", "toxicity")


def http(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {MEDIA_TYPES[FRAMED]}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def batches(base_url: str) -> float:
    """Forward passes so far, over all models and workers."""
    text = requests.get(f"{base_url}/metrics", timeout=10).text
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("binserve_batch_size_samples_count"))


def run(base_url: str, logical: list[list[bytes]], concurrency: int) -> dict:
    """Send each logical request's HTTP requests in order, `concurrency` clients; time the whole."""
    lock, latencies, failures = threading.Lock(), [], []

    def one(client: RawClient, parts: list[bytes]) -> None:
        t0 = time.perf_counter()
        statuses = [client.exchange(p)[0] for p in parts]
        dt = time.perf_counter() - t0
        with lock:
            (latencies.append(dt) if all(s == 200 for s in statuses) else failures.append(statuses))

    before = batches(base_url)
    wall = run_clients(base_url, logical, concurrency, one)
    lat = np.array(latencies) * 1000
    return {
        "req/s": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "forwards": (batches(base_url) - before) / len(logical),
        "http": sum(len(p) for p in logical) / len(logical),
        "failures": len(failures),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1200, help="logical requests per mode")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="binserve-fanout-bench-"))
    topics = write_classifier(root / "topics", TOPICS, seed=0)
    toxicity = write_classifier(root / "toxicity", TOXICITY, multi_label=True, seed=1)
    models = f"minilm=hf_encoder:{default_minilm_path()},topics=hf_encoder:{topics},toxicity=hf_encoder:{toxicity}"
    rng = random.Random(7)
    texts = texts_25(args.requests)
    subsets = [sorted(rng.sample(MODELS, rng.randint(1, 3)), key=MODELS.index) for _ in texts]
    pairs = list(zip(texts, subsets, strict=True))
    fanout = [[http("/infer", dict_to_binary({"texts": [t], "models": s}))] for t, s in pairs]
    body = {t: dict_to_binary({"texts": [t]}) for t in texts}
    separate = [[http(f"/infer/{m}", body[t]) for m in s] for t, s in pairs]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    srv = ServerProcess(workers=0, models=models)
    try:
        srv.start(timeout_s=900)  # three models: each exported, gated and timed at its first load
        run(srv.base_url, fanout[:100], 8)  # warm-up: connections, allocator, every model
        run(srv.base_url, separate[:100], 8)
        rows = [("fan-out (one request)", run(srv.base_url, fanout, args.concurrency))]
        rows.append(("one request per model", run(srv.base_url, separate, args.concurrency)))
    finally:
        srv.stop()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}")
    per = np.mean([len(s) for s in subsets])
    print(f"{args.requests} logical requests at concurrency {args.concurrency}; one ~25-token text each; "
          f"models per request: mean {per:.2f} of 3 (random non-empty subsets)\n")  # fmt: skip
    print("| mode | logical req/s | p50 ms | p95 ms | forward passes / request | HTTP requests / request | failures |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['req/s']:.0f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['forwards']:.2f} | "
              f"{r['http']:.2f} | {r['failures']} |")  # fmt: skip
    print(f"\nfan-out / per-model throughput: {rows[0][1]['req/s'] / rows[1][1]['req/s']:.2f}x")


if __name__ == "__main__":
    main()
