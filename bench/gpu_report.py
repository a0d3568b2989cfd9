"""The GPU check's summary: every phase's figures, the issue's targets met or missed, and tables.

design: the report reads only files (the phases' JSON, the shell's exit codes), so it runs however
the phases ended and says so per phase - `ok`, `failed` (with the error), `timed out`, `not run`.
Targets (issue 26): the server at the highest concurrency >= 0.8x the raw batched throughput of the
same model at the batch size the server formed; bf16 >= 1.5x fp32 raw; the image path with pinned
staging + streams >= 1.3x without; no failed request; every reply within the accuracy gate. The
dry run reports the same figures and judges none of them (a CPU says nothing about a GPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

#: the phases, in the order bench/gpu_check.sh runs them
STEPS = ("tests", "raw", "server", "overlap", "generation")


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _ints(d: dict) -> dict:
    """JSON's string keys back to the batch sizes and concurrencies they were."""
    return {int(k): v for k, v in d.items()}


def phase_status(work: Path, name: str) -> tuple[str, dict]:
    result = _load(work / f"phase-{name}.json")
    rc = (work / f"phase-{name}.rc").read_text().strip() if (work / f"phase-{name}.rc").is_file() else None
    if rc in ("124", "137"):
        return "timed out", result or {}
    if result is None:
        return ("not run" if rc is None else f"failed (exit {rc}, no result)"), {}
    return result["status"], result


def nearest(rates: dict[int, float], batch: float) -> int:
    """The measured batch size nearest `batch` (in ratio: 24 is nearer 32 than 16)."""
    return min(rates, key=lambda b: abs(math.log(b / max(batch, 1.0))))


def best_raw(engines: dict, batch: float) -> tuple[str, int, float]:
    """The fastest engine that passed the gate at the batch size nearest `batch`: (precision, b, seq/s)."""
    gated = {p: _ints(e["seq_per_s"]) for p, e in engines.items() if e["passes_gate"]}
    b = nearest(next(iter(gated.values())), batch)
    precision = max(gated, key=lambda p: gated[p][b])
    return precision, b, gated[precision][b]


def targets(phases: dict) -> list[dict]:
    out = []

    def target(name: str, value: float | None, goal: str, met: bool | None, note: str = "") -> None:
        out.append({"target": name, "value": value, "goal": goal, "met": met, "note": note})

    raw, server, overlap = phases.get("raw"), phases.get("server"), phases.get("overlap")
    if raw and server:
        runs = _ints(server["encoder"])
        c = max(runs)
        r = runs[c]
        precision, b, rate = best_raw(raw["encoder"], r["batch"])
        ratio = r["req/s"] / rate
        note = f"{r['req/s']:.0f} req/s at mean batch {r['batch']:.1f}; raw {precision} b={b}: {rate:.0f}/s"
        target(f"encoder server c={c} / raw at its batch", ratio, ">= 0.8", ratio >= 0.8, note)
    if raw:
        for model in ("encoder", "images"):
            e = raw[model]
            if "bf16" in e:
                fp32, bf16 = _ints(e["fp32"]["seq_per_s"]), _ints(e["bf16"]["seq_per_s"])
                b = max(fp32)
                ratio = bf16[b] / fp32[b]
                target(f"{model} raw bf16 / fp32 at batch {b}", ratio, ">= 1.5", ratio >= 1.5,
                       f"bf16 gate: {e['bf16']['accuracy']}")  # fmt: skip
    if overlap:
        s = overlap["server"]
        ratio = s["pinned"]["req/s"] / s["pageable"]["req/s"]
        ip = {k: _ints(v) for k, v in overlap["in_process"].items()}
        b = max(ip["pinned"])
        target(f"images, pinned + streams / pageable, server c={overlap['concurrency']}", ratio, ">= 1.3",
               ratio >= 1.3, f"in process at batch {b}: {ip['pinned'][b] / ip['pageable'][b]:.2f}x")  # fmt: skip
    drives = [r for k in ("encoder", "images") for r in server[k].values()] if server else []
    drives += list(overlap["server"].values()) if overlap else []
    if drives:
        failed = sum(r["failures"] for r in drives)
        wrong = sum(r["wrong"] for r in drives)
        first = next((r["first_failure"] for r in drives if r["first_failure"]), "")
        target("failed requests", failed, "0", failed == 0, first if failed else "")
        target("replies outside the accuracy gate", wrong, "0", wrong == 0, first if wrong and not failed else "")
    return out


def tables(phases: dict) -> list[str]:
    """Markdown tables of the figures, for bench/RESULTS.md."""
    lines = []
    raw = phases.get("raw")
    if raw:
        for model in ("encoder", "images"):
            engines = raw[model]
            sizes = sorted(_ints(next(iter(engines.values()))["seq_per_s"]))
            lines += [f"\nraw {model} (in process, samples/s, collate + copy + forward + copy back):\n",
                      "| precision | " + " | ".join(f"b={b}" for b in sizes) + " | gate |",
                      "|---|" + "---:|" * len(sizes) + "---|"]  # fmt: skip
            for p, e in engines.items():
                row = _ints(e["seq_per_s"])
                verdict = ("pass" if e["passes_gate"] else "FAIL") + f": {e['accuracy']}"
                lines.append(f"| {p} | " + " | ".join(f"{row[b]:.0f}" for b in sizes) + f" | {verdict} |")
    server = phases.get("server")
    if server:
        lines += [f"\nserver ({server['workers']} workers, {server['settings']}; plans {server['plans']}):\n",
                  "| model | c | req/s | p50 ms | p99 ms | mean batch | GPU util % | failures | wrong |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for model in ("encoder", "images"):
            for c, r in _ints(server[model]).items():
                util = "n/a" if r["gpu_util"] is None else f"{r['gpu_util']:.0f}"
                lines.append(f"| {model} | {c} | {r['req/s']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                             f"{r['batch']:.1f} | {util} | {r['failures']} | {r['wrong']} |")  # fmt: skip
    gen = phases.get("generation")
    if gen:
        lines += [f"\ngeneration (up to {gen['max_tokens']} tokens, greedy; generated tokens/s):\n",
                  "| streams | binserve (continuous) | static generate | ratio | TTFT p50 ms | ITL p50 ms |",
                  "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        static = _ints(gen["static"])
        for c, r in _ints(gen["server"]).items():
            s = static.get(c)
            ratio, s_text = (f"{r['tok/s'] / s:.2f}", f"{s:.0f}") if s else ("", "")
            lines.append(f"| {c} | {r['tok/s']:.0f} | {s_text} | {ratio} | {r['ttft50']:.1f} | {r['itl50']:.1f} |")
    return lines


def report(mode: str, work: Path, out: Path) -> int:
    """Write `out/summary.json`, print the tables and targets; 1 when a phase did not finish ok."""
    statuses, phases = {}, {}
    prereq_problems = _load(work / "prereqs.json")
    if prereq_problems:
        statuses["prereqs"] = "failed: " + "; ".join(prereq_problems)
    for name in ("build", *STEPS):
        status, result = phase_status(work, name) if name != "build" else _build_status(work)
        statuses[name] = status if status != "failed" else f"failed: {result.get('error', 'see check.log')}"
        if status == "ok" and name != "build":
            phases[name] = result
    judged = targets(phases)
    if mode == "dry":
        for t in judged:
            t["met"], t["note"] = None, "dry run on a CPU: not judged. " + t["note"]
    summary = {"machine": _load(work / "machine.json"), "phases": statuses, "targets": judged, "figures": phases}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n".join(tables(phases)))
    print("\nphases: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    for t in judged:
        verdict = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        print(f"- {t['target']}: {t['value']:.4g} (goal {t['goal']}) {verdict}. {t['note']}")
    return 0 if all(v == "ok" for v in statuses.values()) else 1


def _build_status(work: Path) -> tuple[str, dict]:
    rc = (work / "phase-build.rc").read_text().strip() if (work / "phase-build.rc").is_file() else None
    if rc is None:
        return "not run", {}
    if rc == "0" and (work / "models.json").is_file():
        return "ok", {}
    return ("timed out" if rc in ("124", "137") else f"failed (exit {rc})"), {}
