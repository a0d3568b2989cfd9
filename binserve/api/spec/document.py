"""The OpenAPI 3.1 document of an app, built from the routes it registered and the operations
binserve.api.spec.operations declares for them."""

from __future__ import annotations

import re

from flask import Flask

from binserve.api.spec.operations import OPERATIONS

#: served by Flask or by this module, not API routes
_NOT_API = {"static", "docs.openapi", "docs.page_", "docs.asset"}
_CONVERTER = re.compile(r"<(?:(\w+)(?:\(([^)]*)\))?:)?(\w+)>")


class UndocumentedRoute(RuntimeError):
    """A route the app serves has no entry in binserve.api.spec.operations."""


def _path(rule: str) -> tuple[str, list[dict]]:
    """A Flask rule as an OpenAPI path with its path parameters."""
    params = []

    def name(m: re.Match) -> str:
        converter, args, var = m.groups()
        schema = {"type": "string"}
        if converter == "any":
            schema = {"enum": [a.strip().strip("'\"") for a in args.split(",")]}
        elif converter == "model":
            schema = {"type": "string", "description": "a model name, or a hub id 'org/name'"}
        params.append({"name": var, "in": "path", "required": True, "schema": schema})
        return "{" + var + "}"

    return _CONVERTER.sub(name, rule), params


def build(app: Flask, version: str) -> dict:
    """The document for every route `app` serves (admin routes only where this app serves them)."""
    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint in _NOT_API:
            continue
        ops = OPERATIONS.get(rule.endpoint)
        if ops is None:
            raise UndocumentedRoute(f"{rule.rule} ({rule.endpoint}) has no operation in binserve.api.spec.operations")
        path, params = _path(rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            operation = dict(ops[method.lower()])
            operation["operationId"] = f"{rule.endpoint}.{method.lower()}.{path}"
            if params:
                operation["parameters"] = params
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "binserve",
            "version": version,
            "description": "Inference server for PyTorch and Hugging Face models. Binary formats: README.md, "
            "'The wire format'. Errors keep each protocol's own shape.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key or auth_token"},
                "admin": {"type": "http", "scheme": "bearer", "description": "the admin token"},
            }
        },
    }
