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

from bench.serve_bench import drive  # noqa: E402
from bench.texts import texts_25  # noqa: E402
from binary_protocol import dict_to_binary  # noqa: E402
from tests.serverproc import ServerProcess, status_kib  # noqa: E402


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def soak(requests_total: int, phase: int, concurrency: int, warmup: int, **settings) -> dict:
    bodies = [dict_to_binary({"texts": [t]}) for t in texts_25(512)]
    rows = []
    with ServerProcess(workers=2, **settings) as server:
        url = server.base_url
        pids = server.worker_pids()
        ready = {pid: rss_mib(pid) for pid in pids}
        print("ready: " + ", ".join(f"{p}: {v:.0f} MiB" for p, v in ready.items()))
        drive(url, bodies, None, concurrency, warmup)
        start = {pid: rss_mib(pid) for pid in pids}
        print(f"after {warmup} warm-up requests: " + ", ".join(f"{p}: {v:.0f} MiB" for p, v in start.items()))
        sent = 0
        while sent < requests_total:
            n = min(phase, requests_total - sent)
            figures = drive(url, bodies, None, concurrency, n)
            sent += n
            now = {pid: rss_mib(pid) for pid in pids}
            rows.append({"sent": sent, "rss": now, "req/s": figures["req/s"], "failures": figures["failures"]})
            each = "  ".join(f"{p}: {v:.0f} MiB ({v / start[p] - 1:+.1%})" for p, v in now.items())
            print(f"{sent:>7} sent  {figures['req/s']:6.0f} req/s  failures {figures['failures']}  {each}", flush=True)
        assert server.worker_pids() == pids, "a worker was replaced during the soak"
    growth = {pid: rows[-1]["rss"][pid] / start[pid] - 1 for pid in pids}
    failures = sum(r["failures"] for r in rows)
    return {"ready_mib": ready, "start_mib": start, "rows": rows, "growth": growth, "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--phase", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=5_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    result = soak(args.requests, args.phase, args.concurrency, args.warmup)
    print("growth after warm-up: " + ", ".join(f"{p}: {g:+.1%}" for p, g in result["growth"].items())
          + f"; {result['failures']} failed")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
