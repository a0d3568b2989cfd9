"""`GET /openapi.json`, the OpenAPI 3.1 document of the routes this app serves, and `GET /docs`,
Swagger UI over it.

design: Swagger UI's files come from the swagger-ui-py package (Swagger UI 5, which reads OpenAPI
3.1), served from this server, never from a CDN: the page works offline and on an air-gapped
cluster. Only the files the page loads are served, by name. `docs` (a setting) turns the page off;
the document stays, since clients are generated from it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, send_file

from binserve.api.spec.document import build
from binserve.config import VERSION

_ASSETS = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "favicon-32x32.png": "image/png",
}
_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>binserve {version} - API</title>
  <link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
  <link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/assets/swagger-ui-bundle.js"></script>
  <script src="docs/assets/swagger-ui-standalone-preset.js"></script>
  <script src="docs/assets/init.js"></script>
</body>
</html>
"""
_INIT = """window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "BaseLayout",
});
"""


def assets_dir() -> Path | None:
    """swagger-ui-py's static files, without importing the package (it imports web frameworks)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def blueprint(page: bool = True) -> Blueprint:
    bp = Blueprint("docs", __name__)
    built: dict = {}
    static = assets_dir() if page else None

    @bp.get("/openapi.json")
    def openapi():
        # built and serialized once, on first ask, from the app's routes as registered (every
        # blueprint is in by then)
        if "doc" not in built:
            built["doc"] = json.dumps(build(current_app, VERSION), sort_keys=True)
        return Response(built["doc"], content_type="application/json")

    if static is None:
        return bp

    page_html = _PAGE.format(version=VERSION)

    @bp.get("/docs")
    def page_():
        return Response(page_html, content_type="text/html; charset=utf-8")

    @bp.get("/docs/assets/<name>")
    def asset(name: str):
        if name == "init.js":
            return Response(_INIT, content_type="text/javascript")
        if name not in _ASSETS:
            abort(404)
        return send_file(static / name, mimetype=_ASSETS[name], max_age=3600)

    return bp
