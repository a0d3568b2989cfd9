"""Generation benchmark: continuous batching against one request at a time and against Hugging Face
`generate` on a static batch in process (the ceiling).

Run: `make bench-generate` (= `.venv/bin/python -m bench.generate_bench`). A random-weight Llama
made here (4 layers, 256 wide: models/example_causal_lm.py), served by binserve on its defaults;
1, 8 and 32 concurrent streams (`/v1/completions`, `stream: true`, greedy) of up to 64 tokens each,
then the same 8 prompts one request at a time, then `model.generate` in this process on a static,
left-padded batch of the same prompts (1, 8, 32). Printed: generated tokens per second, time to
first token and inter-token latency (p50 / p95, as the client sees the chunks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.example_causal_lm import write_causal_lm  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while people watch from their house near the river".split()


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 3) % 7 : (i * 3) % 7 + 4 + i % 9]) for i in range(n)]


def stream(base_url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: tokens (chunks with text), time to first, gaps between chunks."""
    body = {"model": "lm", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    with requests.post(f"{base_url}/v1/completions", json=body, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    return {"tokens": len(stamps), "ttft": stamps[0] - t0 if stamps else None, "gaps": list(np.diff(stamps))}


def server_run(base_url: str, ps: list[str], concurrency: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: stream(base_url, p, max_tokens), ps))
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "tok/s": sum(r["tokens"] for r in results) / wall,
        "ttft50": np.percentile(ttft, 50) * 1000,
        "ttft95": np.percentile(ttft, 95) * 1000,
        "itl50": np.percentile(gaps, 50) * 1000 if gaps else 0.0,
        "itl95": np.percentile(gaps, 95) * 1000 if gaps else 0.0,
    }


def static_generate(path: Path, ps: list[str], max_tokens: int) -> float:
    """Hugging Face generate on one left-padded batch, in process: generated tokens per second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    batch = tok(ps, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        wall = time.perf_counter() - t0
    new = out[:, batch.input_ids.shape[1] :]
    return int((new != tok.pad_token_id).sum()) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="Gunicorn workers (0: the server's default)")
    ap.add_argument("--skip-static", action="store_true", help="only the server")
    args = ap.parse_args()
    path = write_causal_lm(Path(tempfile.mkdtemp(prefix="binserve-gen-bench-")) / "lm", layers=4, hidden=256)
    ps = prompts(32)
    n_tok = args.max_tokens
    rows = []
    with ServerProcess(workers=args.workers, models=f"lm=hf_causal_lm:{path}") as srv:
        server_run(srv.base_url, ps[:8], 8, 8)  # warm-up
        for c in (1, 8, 32):  # c=1: the 8 prompts one request at a time
            rows.append((f"binserve, {c} concurrent stream(s)", server_run(srv.base_url, ps[: max(c, 8)], c, n_tok)))
    torch.set_num_threads(os.cpu_count() or 1)
    ceilings = {} if args.skip_static else {n: static_generate(path, ps[:n], n_tok) for n in (1, 8, 32)}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    head = f"machine: {platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
    print(head + f"torch {torch.__version__}; Llama 4 layers x 256 (random weights), greedy, up to {n_tok} tokens\n")
    print("| run | generated tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        cells = [f"{r['tok/s']:.0f}"] + [f"{r[k]:.1f}" for k in ("ttft50", "ttft95", "itl50", "itl95")]
        print(f"| {name} | {' | '.join(cells)} |")
    for n, tps in ceilings.items():
        print(f"| HF generate, static batch of {n}, in process | {tps:.0f} | | | | |")
    if ceilings:
        print(f"\nbinserve 32 streams / HF static batch 32: {rows[2][1]['tok/s'] / ceilings[32]:.2f}x; "
              f"8 streams / one at a time: {rows[1][1]['tok/s'] / rows[0][1]['tok/s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
