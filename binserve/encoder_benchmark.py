"""`encoder-server --benchmark`: each configured model timed in this process, one text per call
against batches of `max_batch_size`, as the encoder server's README table reports them.

design: the models load exactly as a worker loads them (the same adapter options, the engine plan
timed and chosen at load), and each call is the worker's own path from texts to outputs:
validate (tokenize) then `run_batch`. Single and batched runs are interleaved over `ROUNDS`
rounds and each keeps its best, so a burst of load on a shared machine hits both.
"""

from __future__ import annotations

import time

from binserve.config import ServerConfig

ROUNDS = 3
_WORDS = "the quick model classifies every sentence it is given while batches grow under load".split()


def texts(n: int) -> list[str]:
    """n sentences of 12-20 words, deterministic."""
    return [" ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(12 + i % 9)) for i in range(n)]


def _time(adapter, batches: list[list[str]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        adapter.run_batch(adapter.validate({"texts": batch}).samples)
    return time.perf_counter() - started


def measure(adapter, n: int, batch_size: int) -> dict:
    """Texts per second one at a time and in batches of `batch_size` (best of ROUNDS interleaved)."""
    sample = texts(n)
    single_runs = [[t] for t in sample]
    batched_runs = [sample[i : i + batch_size] for i in range(0, n, batch_size)]
    single = batched = float("inf")
    for _ in range(ROUNDS):
        single = min(single, _time(adapter, single_runs))
        batched = min(batched, _time(adapter, batched_runs))
    return {"single": n / single, "batched": n / batched, "speedup": single / batched}


def run(config: ServerConfig, n: int) -> list[dict]:
    """Load every configured model, measure it, print the table; the rows."""
    from binserve.capabilities.config import served_models
    from binserve.process.runtime import configure_threads, select_device
    from binserve.serving.loader import adapter_options
    from models.registry import configured_specs, load_model

    configure_threads(config, 0)
    device, options = select_device(config, 0), adapter_options(config)
    rows = []
    print(f"benchmark: {n} texts per run, batches of {config.max_batch_size}, best of {ROUNDS} interleaved rounds")
    for spec in configured_specs(served_models(config.models, config.config), config.served_model_path):
        adapter = load_model(spec, device, options)
        adapter.warmup()
        row = {"model": spec.name, **measure(adapter, n, config.max_batch_size)}
        rows.append(row)
        print(f"{spec.name}: single {row['single']:.1f} req/s; batched {row['batched']:.1f} req/s "
              f"({row['speedup']:.1f}x speedup); engines {adapter.describe()['engines']}", flush=True)  # fmt: skip
    return rows
