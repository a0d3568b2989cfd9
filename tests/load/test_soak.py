"""Worker memory under a steady load: one server on its defaults (Gunicorn, 2 workers, MiniLM), the
lean client of bench/serve_bench.py at concurrency 32; after a warm-up that fills the request
threads and the shapes' caches, each worker's RSS stays flat. `make bench-soak` runs the same soak
for 100k requests (bench/RESULTS.md); this one is sized for CI."""

from __future__ import annotations

from bench.soak_bench import soak


def test_worker_rss_stays_flat_after_warm_up():
    result = soak(requests_total=12_000, phase=4_000, concurrency=32, warmup=8_000)
    growth = ", ".join(f"{g:+.1%}" for g in result["growth"].values())
    print(f"\nsoak of 12k requests after 8k of warm-up: RSS growth per worker {growth}")
    assert result["failures"] == 0
    assert all(g <= 0.05 for g in result["growth"].values()), result["growth"]
