"""A/B of two server configurations, interleaved: both servers run at once, and each round drives A then
B (then B then A), so load on the shared machine hits both alike.

    python -m bench.ab_bench --b env.GOMP_SPINCOUNT=300000 --rounds 6
    python -m bench.ab_bench --a workers=1 --b workers=2 --levels 1,8,32

A configuration is `key=value` items: server settings (`max_wait_ms=2`), `env.NAME=value` for the
server's environment, or `root=DIR` to run another checkout's server.py (a git worktree of the commit
to compare against: `git worktree add /tmp/base HEAD`). Both servers share one engine cache, so they
run the same plan (the plan is timed once, by whichever loads first). Prints, per concurrency level,
the median over rounds of req/s and p50 for A and B and the median of the per-round ratios B/A.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_bench import drive  # noqa: E402
from bench.texts import texts_25  # noqa: E402
from binary_protocol import dict_to_binary  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402


def server(spec: list[str], cache: str) -> ServerProcess:
    """A server for `key=value` items (`env.X=...` go to its environment)."""
    settings, env = {"cache_dir": cache}, {}
    for item in spec:
        key, _, value = item.partition("=")
        if key.startswith("env."):
            env[key[4:]] = value
        else:
            settings[key] = value
    workers = int(settings.pop("workers", 0))
    return ServerProcess(workers=workers, env=env, root=settings.pop("root", None), **settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", action="append", default=[], help="A's key=value (repeatable); default: the defaults")
    ap.add_argument("--b", action="append", default=[], help="B's key=value (repeatable)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--levels", default="1,32")
    ap.add_argument("--requests", type=int, default=400, help="requests per level and round (c=1: a third)")
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="binserve-ab-cache-")
    bodies = [dict_to_binary({"texts": [t]}) for t in texts_25(256)]
    levels = [int(c) for c in args.levels.split(",")]
    results: dict[tuple[str, int], list[dict]] = {}
    with server(args.a, cache) as a:
        with server(args.b, cache) as b:
            for srv in (a, b):
                drive(srv.base_url, bodies, None, 8, 200)  # warm-up
            for r in range(args.rounds):
                order = (("A", a), ("B", b)) if r % 2 == 0 else (("B", b), ("A", a))
                for c in levels:
                    for name, srv in order:
                        n = args.requests if c > 1 else max(100, args.requests // 3)
                        results.setdefault((name, c), []).append(drive(srv.base_url, bodies, None, c, n))
                print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores ({cpu}); A: {args.a or 'defaults'}; B: {args.b or 'defaults'}")
    print(f"{args.rounds} rounds, interleaved; medians over rounds\n")
    print("| level | A req/s | B req/s | B/A req/s | A p50 ms | B p50 ms | B/A p50 | failures A/B |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        ra, rb = results[("A", c)], results[("B", c)]
        ratio = statistics.median(y["req/s"] / x["req/s"] for x, y in zip(ra, rb, strict=True))
        lat = statistics.median(y["p50"] / x["p50"] for x, y in zip(ra, rb, strict=True))
        med = lambda rows, k: statistics.median(row[k] for row in rows)  # noqa: E731
        fails = f"{sum(x['failures'] for x in ra)}/{sum(x['failures'] for x in rb)}"
        print(f"| c={c} | {med(ra, 'req/s'):.0f} | {med(rb, 'req/s'):.0f} | {ratio:.3f} | {med(ra, 'p50'):.2f} | "
              f"{med(rb, 'p50'):.2f} | {lat:.3f} | {fails} |")  # fmt: skip


if __name__ == "__main__":
    main()
