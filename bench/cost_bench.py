"""Where a request's time goes inside binserve: the per-stage account of `Server-Timing`, at c=1 and c=32.

    python -m bench.cost_bench [--requests 1500] [--concurrency 1,32] [--server-arg key=value]

Every reply carries `Server-Timing`: `wait` (the request, whole in the worker's event loop, until a
request thread took it), `parse` (Gunicorn's parser, the WSGI call and Flask's dispatch until the
app's first hook), `decode` (body read, decoded, validated and tokenized), `queue` (until its batch
started), `infer` (its batch: collate, engine, split), `encode` (the reply). The client measures
the whole exchange; what is left is the wake-up of the request thread after its batch (under load,
waiting for the GIL behind the other replies of the batch), the reply's join and write, the
loopback, and the client. Prints the median of each over the requests (medians do not add up exactly).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_bench import RawClient, http_request, run_clients  # noqa: E402
from bench.texts import texts_25  # noqa: E402
from binary_protocol import dict_to_binary  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

STAGES = ("wait", "parse", "decode", "queue", "infer", "encode")
_TIMING = re.compile(rb"^Server-Timing: (.*)$", re.I | re.M)


def measure(base_url: str, requests_: list[bytes], concurrency: int, n: int) -> tuple[list[float], list[dict]]:
    """n exchanges at `concurrency`: client totals (ms) and the Server-Timing stages of each (ms)."""
    totals, stages, lock = [], [], threading.Lock()

    def one(client: RawClient, i: int) -> None:
        t0 = time.perf_counter()
        _, head, _ = client.exchange(requests_[i % len(requests_)], with_head=True)
        total = (time.perf_counter() - t0) * 1000
        timing = dict(part.split(";dur=") for part in _TIMING.search(head).group(1).decode().strip().split(", "))
        with lock:
            totals.append(total)
            stages.append({k: float(v) for k, v in timing.items()})

    run_clients(base_url, range(n), concurrency, one)
    return totals, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--server-arg", action="append", default=[], help="server setting, key=value")
    args = ap.parse_args()
    settings = dict(kv.split("=", 1) for kv in args.server_arg)
    requests_ = [http_request(dict_to_binary({"texts": [t]})) for t in texts_25(256)]
    columns = {}
    with ServerProcess(workers=int(settings.pop("workers", 0)), **settings) as srv:
        measure(srv.base_url, requests_, 8, 300)  # warm-up
        for c in map(int, args.concurrency.split(",")):
            t0 = time.perf_counter()
            totals, stages = measure(srv.base_url, requests_, c, args.requests)
            rate = args.requests / (time.perf_counter() - t0)
            med = {k: statistics.median(s[k] for s in stages) for k in STAGES}
            left = statistics.median(t - sum(s[k] for k in STAGES) for t, s in zip(totals, stages, strict=True))
            columns[c] = (rate, statistics.median(totals), med, left)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    extra = f" + {args.server_arg}" if args.server_arg else ""
    print(f"machine: {os.cpu_count()} cores ({cpu}); binserve defaults{extra}; one ~25-token text a request, framed\n")
    levels = list(columns)
    print("| stage (median ms) | " + " | ".join(f"c={c}" for c in levels) + " |")
    print("|---|" + "---:|" * len(levels))
    names = {
        "wait": "wait: event loop -> request thread",
        "parse": "parse: Gunicorn parser, WSGI, Flask dispatch",
        "decode": "decode: read, decode, validate, tokenize",
        "queue": "queue: until its batch starts",
        "infer": "infer: its batch (collate, engine, split)",
        "encode": "encode: the reply",
    }
    for k in STAGES:
        print(f"| {names[k]} | " + " | ".join(f"{columns[c][2][k]:.3f}" for c in levels) + " |")
    rest = " | ".join(f"{columns[c][3]:.3f}" for c in levels)
    print(f"| the rest: request thread woken after its batch, reply joined, written, sent, read | {rest} |")
    print("| **client total** | " + " | ".join(f"**{columns[c][1]:.3f}**" for c in levels) + " |")
    print("| requests/s | " + " | ".join(f"{columns[c][0]:.0f}" for c in levels) + " |")


if __name__ == "__main__":
    main()
