"""Health and discovery: `/healthz` (liveness), `/readyz` (readiness, with reasons), `/models`, and
the source documents' own probes: `/health` (every document's, one body) and `/model_info` (the
Flask card's).

design: liveness stays 200 while the process can answer at all (a restart would not fix a bad
repository; the worker keeps retrying its loads); readiness is what load balancers follow. `/health`
is readiness too, whatever the served models are (an encoder-only server is as healthy as an LLM
one): 200 "healthy" exactly when `/readyz` is 200, else 503 naming what is loading. Its body is the
union of the fields the documents name (the seed LLM server's `is_ready`, `backend_type`, `gpu_*`;
the encoder server's `models_loaded` and per-model `stats`; the Flask card's `model_loaded`), read
from the metrics every worker writes, so any worker answers for the server.
"""

from __future__ import annotations

import os
import sys

from flask import Blueprint, jsonify

from binserve.config import PATH_IMPORTS_OFF
from binserve.observability import metrics

#: per-model samples behind /health's `stats` (the encoder server's), summed over every worker
_STATS = {
    "requests": "binserve_requests_total",
    "batches": "binserve_batch_size_samples_count",
    "samples": "binserve_batch_size_samples_sum",
    "latency_sum": "binserve_request_duration_seconds_sum",
    "latency_count": "binserve_request_duration_seconds_count",
}


def not_ready_status(manager) -> str | None:
    """None when this server is ready; else what /readyz and /health say: draining, failed (with
    each model's reason), or loading (which model, which version, for how long, and what waits)."""
    if manager.draining:
        return "draining"
    if manager.ready:
        return None if manager.workers_ready() else "loading: other workers of this server are not ready yet"
    reasons = manager.not_ready_reasons()
    if reasons:
        return "failed: " + "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
    loading = manager.loading()
    now = [f"{name} version {m['version']} for {m['seconds']:.0f}s" for name, m in loading.items()
           if m["state"] == "loading"]  # fmt: skip
    after = [name for name, m in loading.items() if m["state"] == "waiting"]
    return "loading" + (f": {', '.join(now)}" if now else "") + (f"; then {', '.join(after)}" if after else "")


def model_stats(names: list[str]) -> dict[str, dict]:
    """The encoder server's per-model `stats`: requests, batches, mean batch size, mean latency (s)
    and throughput (samples/s: the mean batch over the mean latency, as that document computes it)."""
    per = metrics.totals_by("model", names, set(_STATS.values()))
    out = {}
    for name in names:
        t = per[name]
        batches, count = t[_STATS["batches"]], t[_STATS["latency_count"]]
        avg_batch = t[_STATS["samples"]] / batches if batches else 0.0
        avg_latency = t[_STATS["latency_sum"]] / count if count else 0.0
        out[name] = {
            "total_requests": int(t[_STATS["requests"]]),
            "total_batches": int(batches),
            "avg_batch_size": round(avg_batch, 3),
            "avg_latency": round(avg_latency, 6),
            "throughput": round(avg_batch / avg_latency, 3) if avg_latency else 0.0,
        }
    return out


def _gpu_memory(devices: set[str]) -> dict | None:
    """Total, used and free memory of the first GPU a model uses (None on a CPU). torch is read
    from sys.modules: a serving worker has loaded it, and the HTTP layer never imports it."""
    torch = sys.modules.get("torch")
    gpus = sorted(d for d in devices if d.startswith("cuda"))
    if torch is None or not gpus:
        return None
    free, total = torch.cuda.mem_get_info(torch.device(gpus[0]))
    gb = 1024**3
    return {"total": f"{total / gb:.0f}GB", "used": f"{(total - free) / gb:.0f}GB", "free": f"{free / gb:.0f}GB",
            "total_bytes": total, "used_bytes": total - free, "free_bytes": free}  # fmt: skip


#: an engine's precision as the encoder server's /models names a dtype
_DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16", "int8": "torch.qint8"}


def encoder_server_listing(described: list[dict]) -> dict:
    """The encoder server's GET /models: `{name: {num_parameters, device, dtype}}`, the dtype that of
    the engine running the model's small batches (what one request runs on)."""
    out = {}
    for d in described:
        engines = d.get("engines") or []
        precision = engines[0].rsplit("-", 1)[-1] if engines else None
        dtype = _DTYPES.get(precision) or (f"torch.{d['dtype']}" if d.get("dtype") else None)
        out[d["name"]] = {"num_parameters": d.get("parameters"), "device": d.get("device"), "dtype": dtype}
    return out


def llm_server_fields(d: dict, ready: bool) -> dict:
    """The seed LLM server's per-model fields of GET /models: type, context_length, loaded, backend
    (its `parameters`, "3B" there, stays binserve's integer)."""
    engines = d.get("engines") or []
    inputs = d.get("inputs") or {}
    context = inputs.get("max_length") or inputs.get("max_context")
    return {
        "type": "causal_lm" if d.get("adapter") == "hf_causal_lm" else d.get("adapter"),
        "context_length": context if isinstance(context, int) else None,
        "loaded": ready,
        "backend": engines[0] if engines else None,
    }


def blueprint(manager, import_root: str = "", listing: str = "binserve") -> Blueprint:
    """The health routes for `manager`; `import_root` (the setting) is shown by GET /models, in the
    `listing` shape (the `models_listing` setting)."""
    imports = {"import_root": import_root or None, "note": None if import_root else PATH_IMPORTS_OFF}
    bp = Blueprint("health", __name__)

    @bp.get("/healthz")
    def healthz():
        return jsonify(status="ok", pid=os.getpid())

    @bp.get("/readyz")
    def readyz():
        status = not_ready_status(manager)
        if status is None:
            return jsonify(status="ready", pid=os.getpid())
        if status.startswith("failed"):  # the worker keeps retrying; /healthz stays 200 (a restart would not fix it)
            return jsonify(status=status, models=manager.not_ready_reasons(), pid=os.getpid()), 503
        loading = manager.loading() if status.startswith("loading") else None
        if loading:
            return jsonify(status=status, loading=loading, pid=os.getpid()), 503
        return jsonify(status=status, pid=os.getpid()), 503

    @bp.get("/health")
    def health():
        status = not_ready_status(manager)
        served = manager.served()
        names = [m.name for m in served]
        described = {d.get("name"): d for d in manager.describe()}
        default = described.get(manager.default_name, {})
        devices = {str(d.get("device")) for d in described.values() if d.get("device")}
        engines = default.get("engines") or []
        memory = metrics.totals({"binserve_device_memory_bytes"})["binserve_device_memory_bytes"]
        gpus = {d for d in devices if d.startswith("cuda")}
        body = {
            "status": "healthy" if status is None else status,
            "is_loaded": bool(served),
            "is_ready": status is None,
            "backend_type": engines[0] if engines else None,  # the engine that runs the default model's small batches
            "model_loaded": bool(served),
            "tokenizer_loaded": any(m.adapter.token_inputs or m.adapter.generates for m in served),
            "gpu_available": bool(gpus),
            "gpu_count": len(gpus),
            "gpu_memory": _gpu_memory(devices),
            "gpu_memory_bytes": int(memory) if memory else None,
            "models": names,
            "models_loaded": names,
            "default_model": manager.default_name,
            "stats": model_stats(names),
        }
        return jsonify(body), 200 if status is None else 503

    @bp.get("/model_info")
    def model_info():
        """The Flask card's model description: the default model's class, device and parameters."""
        info = {d.get("name"): d for d in manager.describe()}.get(manager.default_name)
        if info is None or not manager.ready:
            return jsonify(error="Model not loaded"), 503
        return jsonify(model_type=info.get("model_type"), device=info.get("device"),
                       parameters=info.get("parameters"), name=info.get("name"), version=info.get("version"))

    @bp.get("/models")
    def models():
        described = manager.describe()
        if listing == "encoder-server":
            return jsonify(encoder_server_listing(described))
        ready = manager.ready
        models = [{**llm_server_fields(d, ready), **d} for d in described]  # binserve's own fields win
        return jsonify(default=manager.default_name, default_model=manager.default_name, ready=ready, models=models,
                       path_imports=imports)  # fmt: skip

    return bp
