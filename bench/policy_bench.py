"""What the policy layer costs and whether it holds: key check + quota admission per request, the
response cache's hits against its misses, and quota accuracy across workers and across replicas.

    python -m bench.policy_bench [--seconds 60] [--rounds 4] [--requests 1500]

1. In process: `identify` + `admit_request` + `admit_tokens` of one limited key, per request, on the
   embedded shared table and (when redis-server is installed) on Redis.
2. Server CPU per request at c=32 on two servers running side by side (2 workers each, MiniLM,
   response cache on), one without keys, one whose every request carries a limited key (requests
   and tokens); both driven at once in each round (32 clients each), so that what else the
   machine does falls on both alike; CPU = user + system time of the servers' processes (/proc).
   The requests are cache hits, so that no forward pass (~4-9 ms of CPU a request here, +-10%
   round to round) buries the tens of us being measured: what differs between the two is the
   key check and the two quota steps.
3. The response cache (64 MiB per worker): c=1 p50 of hits (one text, repeated), of the miss path
   (the same request with `Cache-Control: no-cache`) and of `GET /healthz` (binserve's HTTP path
   alone), and c=32 throughput of hits and misses.
4. Quota accuracy: a key limited to 600 requests/min (burst: the default, 10) driven at c=32 for
   `--seconds` across the 2 workers of one server, then across two servers sharing a redis-server;
   the admitted count against 600 per minute plus the burst.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_bench import RawClient, run_clients  # noqa: E402
from bench.texts import texts_25  # noqa: E402
from binary_protocol import FRAMED, MEDIA_TYPES, dict_to_binary  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

FAST_KEY = "sk-bench-fast-0123456789"  # a quota far above what the bench can spend
RATED_KEY = "sk-bench-600rpm-01234567"  # 600 requests a minute
KEYS = {"keys": [
    {"name": "fast", "key": FAST_KEY, "requests_per_minute": 1e9, "tokens_per_minute": 1e12},
    {"name": "rated", "key": RATED_KEY, "requests_per_minute": 600},
]}  # fmt: skip


def request_bytes(body: bytes, key: str | None = None, extra: str = "") -> bytes:
    head = f"POST /infer HTTP/1.1\r\nHost: bench\r\nContent-Type: {MEDIA_TYPES[FRAMED]}\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    return (head + extra + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def server_cpu_s(srv: ServerProcess) -> float:
    """User + system CPU seconds of the server's master and workers so far."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in [srv.proc.pid, *_children(srv.proc.pid)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def drive(srv: ServerProcess, reqs: list[bytes], concurrency: int, n: int) -> dict:
    """n exchanges; statuses, latencies (ms), wall time and server CPU per request (us)."""
    lat, codes, lock = [], {}, threading.Lock()

    def one(client: RawClient, i: int) -> None:
        t0 = time.perf_counter()
        status, _ = client.exchange(reqs[i % len(reqs)])
        ms = (time.perf_counter() - t0) * 1000
        with lock:
            lat.append(ms)
            codes[status] = codes.get(status, 0) + 1

    cpu0 = server_cpu_s(srv)
    wall = run_clients(srv.base_url, range(n), concurrency, one)
    cpu = server_cpu_s(srv) - cpu0
    return {"rps": n / wall, "p50": statistics.median(lat), "codes": codes, "cpu_us": cpu / n * 1e6}


def in_process(redis_url: str | None, n: int = 20000) -> dict:
    from binserve.config import ServerConfig
    from binserve.policy import buckets
    from binserve.policy.gate import Admission, Policy

    out = {}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "keys.json")
        path.write_text(json.dumps(KEYS))
        for store, url in (("embedded", ""), ("redis", redis_url)):
            if store == "redis" and not url:
                continue
            buckets._table = None
            policy = Policy.from_config(ServerConfig(api_keys_file=str(path), redis_url=url or ""))
            header = f"Bearer {FAST_KEY}"
            t0 = time.perf_counter()
            for _ in range(n):
                a = Admission()
                policy.identify(a, header, "native")
                policy.admit_request(a)
                policy.admit_tokens(a, 25)
            out[store] = (time.perf_counter() - t0) / n * 1e6
    return out


def quota_run(servers: list[ServerProcess], seconds: float, concurrency: int = 32) -> dict:
    """Drive RATED_KEY at `concurrency` (split over `servers`) for `seconds`; admitted and refused."""
    body = dict_to_binary({"texts": ["quota accuracy"]})
    req = request_bytes(body, RATED_KEY)
    counts, lock, stop = {}, threading.Lock(), time.monotonic() + seconds

    def client(srv):
        host, port = srv.base_url.removeprefix("http://").split(":")
        c = RawClient(host, int(port))
        try:
            while time.monotonic() < stop:
                status, _ = c.exchange(req)
                with lock:
                    counts[status] = counts.get(status, 0) + 1
        finally:
            c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(servers[i % len(servers)],)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    expected = 600 * elapsed / 60 + 10  # the rate over the time it ran, plus the burst it started with
    admitted = counts.get(200, 0)
    return {"admitted": admitted, "expected": round(expected, 1), "ratio": admitted / expected, "codes": counts,
            "seconds": round(elapsed, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=1500)
    args = ap.parse_args()
    keys = Path(tempfile.mkdtemp(prefix="binserve-bench-keys-"), "keys.json")
    keys.write_text(json.dumps(KEYS))
    redis_proc = None
    if shutil.which("redis-server"):
        from tests.redisproc import RedisProcess

        redis_proc = RedisProcess()
    try:
        print("1. policy steps in process (identify + admit_request + admit_tokens), us per request:")
        for store, us in in_process(redis_proc.url if redis_proc else None).items():
            print(f"   {store:9s} {us:7.1f} us")

        bodies = [dict_to_binary({"texts": [t]}) for t in texts_25(256)]
        cache = 64 << 20
        plain = ServerProcess(workers=2, response_cache_bytes=cache).start(wait=False)
        keyed = ServerProcess(workers=2, api_keys_file=keys, response_cache_bytes=cache).start(wait=False)
        cached = plain
        try:
            for s in (plain, keyed):
                s.wait_ready(300)
            n_hits = 4 * args.requests
            print(f"2. server CPU per request at c=32 (cache hits), {args.rounds} rounds of {n_hits}, side by side:")
            runs = {"plain": [], "keyed": []}
            warm = [request_bytes(b) for b in bodies]
            drive(plain, warm, 8, 4 * len(bodies))  # every text's entry in each worker's cache
            drive(keyed, [request_bytes(b, FAST_KEY) for b in bodies], 8, 4 * len(bodies))
            for _ in range(args.rounds):  # both at once, 32 clients each: the same machine for both
                pair = {"plain": (plain, None), "keyed": (keyed, FAST_KEY)}
                with ThreadPoolExecutor(2) as pool:
                    done = {
                        name: pool.submit(drive, srv, [request_bytes(b, key) for b in bodies], 32, n_hits)
                        for name, (srv, key) in pair.items()
                    }
                for name, fut in done.items():
                    runs[name].append(fut.result())
            for name, rs in runs.items():
                codes = {k: sum(x["codes"].get(k, 0) for x in rs) for k in {c for x in rs for c in x["codes"]}}
                print(f"   {name:6s} cpu/request median {statistics.median(x['cpu_us'] for x in rs):7.0f} us, "
                      f"req/s median {statistics.median(x['rps'] for x in rs):6.1f}, replies {codes}")  # fmt: skip
            diffs = [k["cpu_us"] - p["cpu_us"] for p, k in zip(runs["plain"], runs["keyed"], strict=True)]
            med = statistics.median(diffs)
            print(f"   keyed - plain, per round: {[round(d) for d in diffs]} us; median {med:.0f} us (target <= 50)")

            print("3. response cache: hits (one text repeated) vs the miss path (Cache-Control: no-cache):")
            hit = [request_bytes(bodies[0])]
            miss = [request_bytes(b, extra="Cache-Control: no-cache\r\n") for b in bodies]
            health = [b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"]
            h1, m1, z1 = drive(cached, hit, 1, 500), drive(cached, miss, 1, 500), drive(cached, health, 1, 500)
            h32, m32 = drive(cached, hit, 32, 6000), drive(cached, miss, 32, args.requests)
            print(f"   c=1  p50 hit {h1['p50']:.2f} ms, miss {m1['p50']:.2f} ms, GET /healthz {z1['p50']:.2f} ms: "
                  f"a hit costs {h1['p50'] - z1['p50']:.2f} ms beyond the HTTP path (target <= 1)")  # fmt: skip
            ratio = h32["rps"] / m32["rps"]
            print(f"   c=32 req/s hit {h32['rps']:.0f}, miss {m32['rps']:.0f}: {ratio:.1f}x (target >= 5x)")

            print(f"4. quota accuracy, 600 requests/min at c=32 for {args.seconds:.0f} s:")
            q = quota_run([keyed], args.seconds)
            print(f"   one server, 2 workers: admitted {q['admitted']} of {q['expected']} "
                  f"({(q['ratio'] - 1) * 100:+.1f}%), replies {q['codes']}")  # fmt: skip
        finally:
            for s in (plain, keyed):
                s.stop()
        if redis_proc is None:
            print("   two replicas: skipped (redis-server not installed)")
            return
        a = ServerProcess(workers=1, api_keys_file=keys, redis_url=redis_proc.url).start(wait=False)
        b = ServerProcess(workers=1, api_keys_file=keys, redis_url=redis_proc.url).start(wait=False)
        try:
            a.wait_ready(300)
            b.wait_ready(300)
            q = quota_run([a, b], args.seconds)
            print(f"   two servers sharing Redis: admitted {q['admitted']} of {q['expected']} "
                  f"({(q['ratio'] - 1) * 100:+.1f}%), replies {q['codes']}")  # fmt: skip
        finally:
            a.stop()
            b.stop()
    finally:
        if redis_proc is not None:
            redis_proc.stop()


if __name__ == "__main__":
    main()
