"""Capability batching (document 000) against its "traditional execution": texts per second and
capability executions for the same texts, three capabilities each, from concurrent clients.

Run: `make bench-classify` (= `.venv/bin/python -m bench.classify_bench`). One server, one worker,
serving the example causal LM's README size (a random Llama, 4 layers x 256) as `lm`, and a
`topics.json` of four topics, recommendations of 16 greedy tokens and one alert rule. 1,000 texts
(--texts), one text per request, every request asking classification, recommendations and alerts,
from 32 concurrent clients (--concurrency), two ways on the same server build:
(a) capability batching: `--batch-timeout 0.1 --batch-size 25` (the document's defaults);
(b) traditional execution: `--batch-timeout 0 --batch-size 1` - every request runs each of its
    capabilities alone, one request after another, as the document's "before" describes.
Printed: texts/s, p50 latency, and capability executions per text (from /stats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.examples.causal_lm import write_causal_lm  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

CAPABILITIES = ["classification", "recommendations", "alerts"]
TOPICS = [{"name": "training", "description": "courses and workshops"}, {"name": "billing", "description":
          "invoices and payments"}, {"name": "outage", "description": "systems down"},
          {"name": "praise", "description": "thanks"}]  # fmt: skip
WORDS = "the training was excellent but my invoice is wrong and the site is down again thanks a lot".split()


def texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + i % 9)) for i in range(n)]


def run(base: str, items: list[str], concurrency: int) -> dict:
    before = requests.get(f"{base}/stats", timeout=30).json()["classify"]
    latencies, failures = [], []

    def one(text: str) -> None:
        t0 = time.perf_counter()
        r = requests.post(f"{base}/classify", json={"texts": [text], "capabilities": CAPABILITIES}, timeout=600)
        (latencies.append(time.perf_counter() - t0) if r.status_code == 200 else failures.append(r.status_code))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, items))
    seconds = time.perf_counter() - started
    after = requests.get(f"{base}/stats", timeout=30).json()["classify"]
    executions = sum(after["capabilities"][c]["executions"] - before["capabilities"][c]["executions"]
                     for c in CAPABILITIES)  # fmt: skip
    return {"texts_per_s": len(items) / seconds, "p50_ms": 1000 * statistics.median(latencies) if latencies else 0,
            "executions": executions, "failures": len(failures), "seconds": seconds}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-classify-"))
    lm = write_causal_lm(work / "lm", layers=4, hidden=256)
    config = work / "topics.json"
    config.write_text(json.dumps({"model": "lm", "topics": TOPICS, "recommendations": {"max_tokens": 16},
                                  "alerts": {"rules": [{"topic": "outage", "threshold": 0.3}]}}))  # fmt: skip
    items = texts(args.texts)
    rows = {}
    for label, batch_timeout, batch_size in (("capability batching", 0.1, 25), ("traditional execution", 0.0, 1)):
        with ServerProcess(workers=1, models=f"lm=hf_causal_lm:{lm}", config=config, batch_timeout=batch_timeout,
                           batch_size=batch_size, model_repository=work / f"repo-{batch_size}") as srv:  # fmt: skip
            run(srv.base_url, items[:32], args.concurrency)  # warm-up
            rows[label] = run(srv.base_url, items, args.concurrency)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())  # fmt: skip
    print(f"machine: {cpu}, {os.cpu_count()} cores; {args.texts} texts x {len(CAPABILITIES)} capabilities, "
          f"{args.concurrency} clients, one text per request")  # fmt: skip
    print("| execution | texts/s | p50 ms | capability executions | per text | failures |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['texts_per_s']:.1f} | {r['p50_ms']:.0f} | {r['executions']} | "
              f"{r['executions'] / args.texts:.2f} | {r['failures']} |")  # fmt: skip
    ratio = rows["capability batching"]["texts_per_s"] / rows["traditional execution"]["texts_per_s"]
    print(f"capability batching / traditional: {ratio:.2f}x texts/s (target >= 3x)")


if __name__ == "__main__":
    main()
