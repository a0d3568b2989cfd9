"""Health and discovery: `/healthz` (liveness), `/readyz` (readiness, with reasons), `/models`.

design: liveness stays 200 while the process can answer at all (a restart would not fix a bad
repository; the worker keeps retrying its loads); readiness is what load balancers follow.
"""

from __future__ import annotations

import os

from flask import Blueprint, jsonify

from binserve.config import PATH_IMPORTS_OFF


def blueprint(manager, import_root: str = "") -> Blueprint:
    """The health routes for `manager`; `import_root` (the setting) is shown by GET /models."""
    imports = {"import_root": import_root or None, "note": None if import_root else PATH_IMPORTS_OFF}
    bp = Blueprint("health", __name__)

    @bp.get("/healthz")
    def healthz():
        return jsonify(status="ok", pid=os.getpid())

    @bp.get("/readyz")
    def readyz():
        if manager.draining:
            return jsonify(status="draining", pid=os.getpid()), 503
        if manager.ready:
            if not manager.workers_ready():
                return jsonify(status="loading: other workers of this server are not ready yet", pid=os.getpid()), 503
            return jsonify(status="ready", pid=os.getpid())
        reasons = manager.not_ready_reasons()
        if reasons:  # the worker keeps retrying; /healthz stays 200 (a restart would not fix the repository)
            status = "failed: " + "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
            return jsonify(status=status, models=reasons, pid=os.getpid()), 503
        loading = manager.loading()
        now = [f"{name} version {m['version']} for {m['seconds']:.0f}s" for name, m in loading.items()
               if m["state"] == "loading"]  # fmt: skip
        after = [name for name, m in loading.items() if m["state"] == "waiting"]
        status = "loading" + (f": {', '.join(now)}" if now else "") + (f"; then {', '.join(after)}" if after else "")
        return jsonify(status=status, loading=loading, pid=os.getpid()), 503

    @bp.get("/models")
    def models():
        return jsonify(
            default=manager.default_name, ready=manager.ready, models=manager.describe(), path_imports=imports
        )

    return bp
