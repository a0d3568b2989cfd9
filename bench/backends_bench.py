"""Generation backends, like for like: every row greedy, stopping at the model's end-of-sequence
token, counting generated token ids (not SSE chunks).

Run: `make bench-backends` (= `.venv/bin/python -m bench.backends_bench`). Random-weight Llamas made
here (models/examples/causal_lm.py), two sizes. Per size, at 1, 8 and 32 streams of ~32-token
prompts and up to 64 new tokens:
- in process: transformers `generate` on one static left-padded batch, fp32 and bf16 weights (the
  reference: best of three); binserve's loop; OpenVINO GenAI fp32 and bf16 (each: the sequences
  submitted at once, best of three);
- through HTTP: a binserve server per backend (`generation_backend` loop / openvino), streams on
  `/v1/completions` with `stream_options.include_usage` (the usage's completion_tokens are the
  count), time to first token and inter-token latency per stream.
Printed: tokens per second per row and the ratios the generation-backend issue sets targets for.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from binserve.scheduling.contract import BatchSettings  # noqa: E402
from binserve.scheduling.sequences import SamplingParams, Sequence  # noqa: E402
from models.examples.causal_lm import write_causal_lm  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while people watch from their house near the river".split()
STREAMS = (1, 8, 32)
SIZES = {"8x512": {"layers": 8, "hidden": 512, "heads": 8, "kv_heads": 4}, "4x256": {"layers": 4, "hidden": 256}}


def prompts(n: int) -> list[str]:
    """n prompts of ~32 tokens, each different."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12 + i % 5)) for i in range(n)]


def best_of(n: int, fn) -> float:
    return max(fn() for _ in range(n))


def hf_generate(model, tok, ps: list[str], max_tokens: int) -> float:
    """`generate` on one static batch: tokens up to each row's EOS per second."""
    batch = tok(ps, return_tensors="pt", padding=True)
    eos = tok.eos_token_id

    def once() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        wall = time.perf_counter() - t0
        new = out[:, batch.input_ids.shape[1] :].tolist()
        return sum(row.index(eos) if eos in row else len(row) for row in new) / wall

    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
    return best_of(3, once)


def backend_rate(backend, tok, ps: list[str], max_tokens: int) -> float:
    """The sequences submitted at once to a started backend: generated tokens per second."""

    def once() -> float:
        seqs = [Sequence(tok(p).input_ids, SamplingParams(max_tokens, 0.0), time.monotonic() + 600) for p in ps]
        t0 = time.perf_counter()
        for s in seqs:
            backend.submit_sequence(s)
        for s in seqs:
            for _ in s.stream(600):
                pass
        return sum(len(s.output) for s in seqs) / (time.perf_counter() - t0)

    backend_rate_warm = [Sequence(tok(ps[0]).input_ids, SamplingParams(4, 0.0), time.monotonic() + 600)]
    for s in backend_rate_warm:
        backend.submit_sequence(s)
        list(s.stream(600))
    return best_of(3, once)


def in_process(path: Path, export: Path, max_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from binserve.scheduling.continuous import ContinuousBatcher
    from binserve.scheduling.openvino_genai import OpenVINOGenerator

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    fp32 = AutoModelForCausalLM.from_pretrained(path).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    eos = (tok.eos_token_id,)
    rows: dict[str, dict[int, float]] = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        rows[f"transformers generate {name} (static batch)"] = {
            n: hf_generate(model, tok, prompts(n), max_tokens) for n in STREAMS
        }
    settings = BatchSettings(32, 8192)
    loop = ContinuousBatcher(fp32, tok, torch.device("cpu"), settings, eos_ids=eos).start()
    try:
        rows["binserve loop (in process)"] = {n: backend_rate(loop, tok, prompts(n), max_tokens) for n in STREAMS}
    finally:
        loop.close()
    threads = torch.get_num_threads()
    for precision in ("fp32", "bf16"):
        ov = OpenVINOGenerator(export, tok, settings, precision=precision, threads=threads, eos_ids=eos).start()
        try:
            rows[f"OpenVINO GenAI {precision} (in process)"] = {
                n: backend_rate(ov, tok, prompts(n), max_tokens) for n in STREAMS
            }
        finally:
            ov.close()
    return rows


def stream(base_url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    stamps, tokens = [], None
    with requests.post(f"{base_url}/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    itl = (stamps[-1] - stamps[0]) / (tokens - 1) if stamps and tokens and tokens > 1 else None
    return {"tokens": tokens or 0, "ttft": stamps[0] - t0 if stamps else None, "itl": itl}


def through_http(base_url: str, model: str, max_tokens: int) -> dict[int, dict]:
    out = {}
    for n in STREAMS:
        stream(base_url, model, prompts(1)[0], 4)  # warm
        ps = prompts(n)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(lambda p: stream(base_url, model, p, max_tokens), ps))
        wall = time.perf_counter() - t0
        ttft = [r["ttft"] for r in results if r["ttft"] is not None]
        itl = [r["itl"] for r in results if r["itl"] is not None]
        out[n] = {
            "tok/s": sum(r["tokens"] for r in results) / wall,
            "ttft50": float(np.median(ttft)) * 1000,
            "itl50": float(np.median(itl)) * 1000 if itl else 0.0,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"model sizes, of {list(SIZES)}")
    ap.add_argument("--workers", type=int, default=0, help="the servers' Gunicorn workers (0: the server's default)")
    args = ap.parse_args()
    from binserve.engines.genai_export import export_for_genai, export_python
    from binserve.process.coreshare import usable_cores

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {usable_cores()} cores ({cpu}), {platform.python_version()}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="binserve-backends-"))
    for size in args.sizes.split(","):
        path = write_causal_lm(work / size, **SIZES[size])
        export = export_for_genai(path, str(work / "cache"), export_python())
        rows = in_process(path, export, args.max_tokens)
        print(f"{size}: in process: {rows}", flush=True)
        http = {}
        for backend in ("loop", "openvino"):
            with ServerProcess(workers=args.workers, model_path=str(path), generation_backend=backend,
                               cache_dir=str(work / "cache")) as srv:  # fmt: skip
                served = requests.get(f"{srv.base_url}/models", timeout=10).json()["models"][0]
                row = f"binserve HTTP, {backend} ({served['engines'][0]})"
                http[row] = through_http(srv.base_url, served["name"], args.max_tokens)
                print(f"{size}: {backend} through HTTP: {http}", flush=True)
        report(size, rows, http)


def report(size: str, rows: dict, http: dict) -> None:
    print(f"\n## {size} (random-weight Llama), greedy, EOS on, up to 64 new tokens\n")
    print("| row | 1 stream tok/s | 8 | 32 | TTFT p50 ms (1 / 8 / 32) | ITL p50 ms (1 / 8 / 32) |")
    print("|---|---:|---:|---:|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r[1]:.0f} | {r[8]:.0f} | {r[32]:.0f} | - | - |")
    for name, r in http.items():
        t = " / ".join(f"{r[n]['ttft50']:.0f}" for n in STREAMS)
        i = " / ".join(f"{r[n]['itl50']:.1f}" for n in STREAMS)
        print(f"| {name} | {r[1]['tok/s']:.0f} | {r[8]['tok/s']:.0f} | {r[32]['tok/s']:.0f} | {t} | {i} |")
    ref = rows["transformers generate fp32 (static batch)"]
    ov_http = next(v for k, v in http.items() if ", openvino (" in k)
    ov_engine = next(k for k in http if ", openvino (" in k)
    ov_row = "OpenVINO GenAI bf16 (in process)" if "bf16" in ov_engine else "OpenVINO GenAI fp32 (in process)"
    loop_http = next(v for k, v in http.items() if ", loop (" in k)
    print()
    for n in (8, 32):
        print(f"- {n} streams: HTTP / in process, openvino: {ov_http[n]['tok/s'] / rows[ov_row][n]:.2f}x; "
              f"loop: {loop_http[n]['tok/s'] / rows['binserve loop (in process)'][n]:.2f}x")  # fmt: skip
    http_ov, http_loop = ov_http[8]["tok/s"] / ref[8], loop_http[8]["tok/s"] / ref[8]
    print(f"- 8 streams vs transformers generate fp32: {ov_row} {rows[ov_row][8] / ref[8]:.2f}x; "
          f"HTTP openvino {http_ov:.2f}x; HTTP loop {http_loop:.2f}x")  # fmt: skip
    print(f"- TTFT p50 at 8 streams: openvino {ov_http[8]['ttft50']:.0f} ms, loop {loop_http[8]['ttft50']:.0f} ms")


if __name__ == "__main__":
    main()
