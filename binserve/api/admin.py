"""The admin surface: `POST /update_model` (hot reload), model control (`/v2/repository/...`, as
Triton's: index, load, unload) - all with the admin token - and `GET /metrics`.

design: with `admin_port` set these routes answer only on that port (404 on the inference port,
and so on the Service that exposes only it). What the admin token allows is documented in the
README: it is powerful (it chooses model code among trusted packages and data under the import
root) but it is not a shell.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import NotFound

from binserve.api.pipeline import Pipeline, check_token
from binserve.errors import BadRequest, Forbidden
from binserve.observability import metrics
from binserve.serving.control import ModelControl


def blueprint(pipeline: Pipeline) -> Blueprint:
    """The admin routes on `pipeline`'s config and manager."""
    bp = Blueprint("admin", __name__)
    config, manager = pipeline.config, pipeline.manager

    @bp.before_request
    def _admin_port_only():
        if config.admin_port and request.environ.get("SERVER_PORT") != str(config.admin_port):
            raise NotFound()

    @bp.get("/metrics")
    def metrics_endpoint():
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)

    def admin_only(route: str) -> None:
        if not config.admin_token:
            raise Forbidden(
                f"{route} is disabled: start the server with BINSERVE_ADMIN_TOKEN=<secret> "
                "(or --admin-token) and send it as 'Authorization: Bearer <secret>'"
            )
        check_token(config.admin_token)

    def timeout_of(payload: dict) -> float:
        timeout_s = payload.get("timeout_s", config.reload_timeout_s)
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not 0 < timeout_s <= 3600:
            raise BadRequest("'timeout_s' must be a number of seconds in (0, 3600]")
        return timeout_s

    def optional_body() -> dict:
        """tritonclient sends an empty body (or parameters); curl may send none."""
        return pipeline.decode()[0] if request.content_length else {}

    @bp.post("/v2/repository/index")
    def repository_index():
        admin_only("/v2/repository")
        return jsonify(ModelControl(manager).index())

    @bp.post("/v2/repository/models/<model:model>/<any(load, unload):action>")
    def control_model(model: str, action: str):
        admin_only("/v2/repository")
        control = ModelControl(manager)
        result = (control.load if action == "load" else control.unload)(model, timeout_of(optional_body()))
        return jsonify(result), (200 if result["converged"] else 504)

    @bp.post("/update_model")
    def update_model():
        admin_only("/update_model")
        payload, _ = pipeline.decode()
        name = payload.get("model") or manager.default_name
        version, path = payload.get("version"), payload.get("path")
        if (version is None) == (path is None):
            raise BadRequest("send exactly one of 'version' (in the repository) or 'path' (a directory to import)")
        for key in ("model", "version", "path", "adapter"):
            if payload.get(key) is not None and not isinstance(payload[key], str):
                raise BadRequest(f"{key!r} must be a string")
        timeout_s = timeout_of(payload)
        result = manager.update(name, version=version, path=path, adapter=payload.get("adapter"), timeout_s=timeout_s)
        if result["converged"]:
            return jsonify(result)
        lagging = sorted(w for w, v in result["workers"].items() if v != result["version"])
        body = {
            "error": {
                "type": "reload_incomplete",
                "message": f"workers {lagging} do not serve version {result['version']} after {timeout_s}s",
            },
            **result,
        }
        return jsonify(body), 504

    return bp
