"""Memory soak: one server on its defaults under a long steady load, each worker's RSS sampled as it goes.

Run: `make bench-soak` (= `.venv/bin/python -m bench.soak_bench --requests 100000`). binserve starts
under Gunicorn on loopback (2 workers, MiniLM); the lean client of bench/serve_bench.py sends
~25-token texts in the framed format at concurrency 32, in phases; after each phase every worker's
RSS (/proc/PID/status VmRSS) is printed. The figure that matters: each worker's RSS at the end over
its RSS after the warm-up phase (the target is <= +5%), and whether the last phases still grow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.serve_bench import drive  # noqa: E402
from bench.texts import texts_25  # noqa: E402
from binary_protocol import dict_to_binary  # noqa: E402
from tests.serverproc import ServerProcess, status_kib  # noqa: E402


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages (libraries, memory-mapped weights) counted once across processes."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def memory(pids: list[int]) -> dict[int, tuple[float, float]]:
    return {pid: (rss_mib(pid), pss_mib(pid)) for pid in pids}


def shown(mem: dict[int, tuple[float, float]], start: dict | None = None) -> str:
    return ", ".join(
        f"{p}: RSS {r:.0f} MiB" + (f" ({r / start[p][0] - 1:+.1%})" if start else "") + f" PSS {s:.0f} MiB"
        for p, (r, s) in mem.items()
    )


def varied_bodies(n: int = 512) -> list[bytes]:
    """Requests of 1-16 texts of 25-250 tokens: every batch shape the server can be made to run."""
    rng = np.random.default_rng(7)
    pool = texts_25(1024)
    bodies = []
    for _ in range(n):
        sizes = rng.integers(1, 11, rng.integers(1, 17))  # texts of 1-10 pieces of ~25 tokens each
        texts = [" ".join(pool[j] for j in rng.integers(0, len(pool), k)) for k in sizes]
        bodies.append(dict_to_binary({"texts": texts}))
    return bodies


def soak(requests_total: int, phase: int, concurrency: int, warmup: int, varied: bool = False, **settings) -> dict:
    bodies = varied_bodies() if varied else [dict_to_binary({"texts": [t]}) for t in texts_25(512)]
    rows = []
    with ServerProcess(workers=2, **settings) as server:
        url = server.base_url
        pids = server.worker_pids()
        ready = memory(pids)
        print("ready (idle): " + shown(ready))
        drive(url, bodies, None, concurrency, warmup)
        start = memory(pids)
        print(f"after {warmup} warm-up requests: " + shown(start))
        sent = 0
        while sent < requests_total:
            n = min(phase, requests_total - sent)
            figures = drive(url, bodies, None, concurrency, n)
            sent += n
            now = memory(pids)
            rows.append({"sent": sent, "memory": now, "req/s": figures["req/s"], "failures": figures["failures"]})
            print(f"{sent:>7} sent  {figures['req/s']:6.0f} req/s  failures {figures['failures']}  {shown(now, start)}",
                  flush=True)  # fmt: skip
        assert server.worker_pids() == pids, "a worker was replaced during the soak"
        idle = memory(pids)
        print("after the soak (idle): " + shown(idle))
    growth = {pid: rows[-1]["memory"][pid][0] / start[pid][0] - 1 for pid in pids}
    failures = sum(r["failures"] for r in rows)
    return {"ready_mib": ready, "start_mib": start, "idle_mib": idle, "rows": rows, "growth": growth,
            "failures": failures}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--phase", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=5_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--varied", action="store_true", help="1-16 texts of 25-250 tokens a request, not one short text")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    result = soak(args.requests, args.phase, args.concurrency, args.warmup, varied=args.varied)
    print("growth after warm-up: " + ", ".join(f"{p}: {g:+.1%}" for p, g in result["growth"].items())
          + f"; {result['failures']} failed")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
