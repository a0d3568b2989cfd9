"""Serving benchmark: the raw model's batched throughput (the ceiling) vs binserve under Gunicorn.

Run: `make bench-serve` (= `.venv/bin/python -m bench.serve_bench`). In one run on one machine it
(1) times MiniLM itself (inference_mode, pre-tokenized, in this process) at batch 1..64; (2) starts
binserve with Gunicorn on loopback; (3) drives it with a lean threaded client, one text per request
in the framed format, at several concurrencies and with a mixed-length workload; (4) prints
req/s, latency percentiles, mean batch size and padding ratio (read from /models), the client's
CPU share, and efficiency = server req/s / raw seq/s at the matching batch size.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import resource
import signal
import sys
import threading
import time

import numpy as np
import requests
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from binary_protocol import FRAMED, MEDIA_TYPES, dict_to_binary  # noqa: E402
from models.registry import ModelSpec, default_minilm_path, load_model  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

WORDS = (
    "the quick brown fox jumps over a lazy dog while people watch from their house near the river "
    "and children play in the park after school on sunny days with friends and family"
).split()


def text_of(n_tokens: int, seed: int) -> str:
    """A text MiniLM tokenizes to exactly n_tokens (with [CLS] and [SEP]): one token per word."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=max(1, n_tokens - 2)))


def raw_model(batch_sizes, seconds: float) -> dict[int, float]:
    """seq/s of MiniLM itself at each batch size (~25-token texts, pre-tokenized)."""
    model = load_model(ModelSpec("minilm", "hf_encoder", default_minilm_path()), torch.device("cpu"))
    samples = model.validate({"texts": [text_of(25, i) for i in range(max(batch_sizes))]}).samples
    out = {}
    for b in batch_sizes:
        batch = samples[:b]
        model.run_batch(batch)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.run_batch(batch)
            n += 1
        out[b] = n * b / (time.perf_counter() - t0)
    del model
    return out


def raw_latency_ms(samples: int = 200) -> float:
    """Median time of one batch-1 forward (the floor for a lone request's latency)."""
    model = load_model(ModelSpec("minilm", "hf_encoder", default_minilm_path()), torch.device("cpu"))
    s = model.validate({"texts": [text_of(25, 0)]}).samples
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        model.run_batch(s)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def model_stats(base_url: str) -> dict:
    info = requests.get(f"{base_url}/models", timeout=10).json()
    return next(m for m in info["models"] if m["name"] == info["default"])["stats"]


def drive(base_url: str, bodies: list[bytes], concurrency: int, n_requests: int) -> dict:
    """Send n_requests pre-encoded bodies with `concurrency` threads (one keep-alive session each)."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(n_requests))
    headers = {"Content-Type": MEDIA_TYPES[FRAMED]}

    host, port = base_url.removeprefix("http://").split(":")

    def worker():
        # http.client on one keep-alive connection: the leanest Python client, so that the client
        # takes as little as possible of the CPU it shares with the server.
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                conn.close()
                return
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/infer", body=bodies[i % len(bodies)], headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200
                err = f"{resp.status} {data[:200]!r}"
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                ok, err = False, repr(exc)
            dt = time.perf_counter() - t0
            with lock:
                (latencies.append(dt) if ok else failures.append(err))

    before = model_stats(base_url)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    after = model_stats(base_url)
    batches = after["batches"] - before["batches"]
    padded = after["padded_tokens"] - before["padded_tokens"]
    real = after["real_tokens"] - before["real_tokens"]
    lat = np.array(latencies) * 1000
    return {
        "req/s": len(latencies) / wall,
        "tokens/s": real / wall,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "batch": (after["samples"] - before["samples"]) / batches if batches else 0.0,
        "padding": 1 - real / padded if padded else 0.0,
        "client_cpu": ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime))
        / wall
        / (os.cpu_count() or 1),
        "failures": len(failures),
        "first_failure": failures[0] if failures else "",
    }


def nearest(raw: dict[int, float], batch: float) -> int:
    return min(raw, key=lambda b: abs(b - batch))


def _exit_on_sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")  # unwinds the `with ServerProcess` below


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500, help="requests per concurrency level")
    ap.add_argument("--raw-seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    batch_sizes = [1, 2, 4, 8, 16, 32, 64]
    raw = raw_model(batch_sizes, args.raw_seconds)
    raw_ms = raw_latency_ms()
    # The raw phase is over: release this process's torch threads before the server needs the cores.
    torch.set_num_threads(1)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}; client and server on the same machine"
    )
    print("\nRaw MiniLM (in process, inference_mode, pre-tokenized ~25-token texts):\n")
    print("| batch | " + " | ".join(map(str, batch_sizes)) + " |")
    print("|---|" + "---:|" * len(batch_sizes))
    print("| seq/s | " + " | ".join(f"{raw[b]:.0f}" for b in batch_sizes) + " |")
    print(f"\nraw batch-1 forward, median: {raw_ms:.2f} ms")

    same = [dict_to_binary({"texts": [text_of(25, i)]}) for i in range(256)]
    rng = np.random.default_rng(1)
    mixed_lengths = rng.integers(5, 251, 512)
    mixed = [dict_to_binary({"texts": [text_of(int(n), i)]}) for i, n in enumerate(mixed_lengths)]
    uniform_mean = [dict_to_binary({"texts": [text_of(int(mixed_lengths.mean()), i)]}) for i in range(256)]
    rows = []
    with ServerProcess(workers=args.workers) as srv:
        drive(srv.base_url, same, 8, 200)  # warm the server's allocator and connections
        for c in map(int, args.concurrency.split(",")):
            n = args.requests if c > 1 else max(200, args.requests // 5)
            rows.append((f"same-length, c={c}", c, drive(srv.base_url, same, c, n)))
            print(f"  measured {rows[-1][0]}: {rows[-1][2]['req/s']:.0f} req/s", file=sys.stderr, flush=True)
        rows.append((f"uniform {int(mixed_lengths.mean())} tok, c=64", 64, drive(srv.base_url, uniform_mean, 64, 600)))
        rows.append(("mixed 5-250 tok, c=64", 64, drive(srv.base_url, mixed, 64, 600)))
    print("\nbinserve (Gunicorn, 1 text per request, framed format):\n")
    print(
        "| workload | req/s | p50 ms | p95 ms | p99 ms | mean batch | padding | client CPU | raw seq/s at batch |"
        " efficiency | failures |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, _, r in rows:
        b = nearest(raw, r["batch"])
        eff = r["req/s"] / raw[b] if "same" in name else float("nan")
        print(
            f"| {name} | {r['req/s']:.0f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['batch']:.1f} | "
            f"{r['padding']:.1%} | {r['client_cpu']:.0%} | {raw[b]:.0f} (b={b}) | {eff:.2f} | {r['failures']} |"
        )
    res = {name: r for name, _, r in rows}
    c1 = res.get("same-length, c=1")
    print("\nTargets:")
    for c in (32, 64):
        r = res.get(f"same-length, c={c}")
        if r:
            ratio = r["req/s"] / raw[32]
            print(
                f"- c={c}: server req/s / raw batch-32 seq/s = {ratio:.2f} (target >= 0.80) "
                f"-> {'PASS' if ratio >= 0.8 else 'FAIL'}"
            )
    if c1:
        print(
            f"- c=1: p50 {c1['p50']:.1f} ms vs raw batch-1 {raw_ms:.1f} ms + 3 ms -> "
            f"{'PASS' if c1['p50'] <= raw_ms + 3 else 'FAIL'}"
        )
    mx, un = res["mixed 5-250 tok, c=64"], res[f"uniform {int(mixed_lengths.mean())} tok, c=64"]
    print(
        f"- mixed lengths: padding {mx['padding']:.1%} (target < 25%) -> {'PASS' if mx['padding'] < 0.25 else 'FAIL'}; "
        f"tokens/s {mx['tokens/s']:.0f} vs uniform {un['tokens/s']:.0f} = {mx['tokens/s'] / un['tokens/s']:.2f} "
        f"(target >= 0.90) -> {'PASS' if mx['tokens/s'] >= 0.9 * un['tokens/s'] else 'FAIL'}"
    )
    total_failures = sum(r["failures"] for _, _, r in rows)
    print(f"- failed requests over the whole run: {total_failures} -> {'PASS' if total_failures == 0 else 'FAIL'}")
    if total_failures:
        print("  first failure:", next(r["first_failure"] for _, _, r in rows if r["failures"]))


if __name__ == "__main__":
    main()
