"""GET /openapi.json: a valid OpenAPI 3.1 document of every route the app serves, whose schemas the
replies (and each protocol's errors) really follow, and which the README's routes table lists."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
from flask import Flask
from openapi_spec_validator import validate

from binserve.api import openai_compat, openai_generate, seed
from binserve.api.spec import schemas
from binserve.api.spec.document import UndocumentedRoute, build
from binserve.config import VERSION


@pytest.fixture
def doc(make_client):
    resp = make_client(auth_token="s3cret", admin_token="adm").get("/openapi.json")  # no token needed
    assert resp.status_code == 200 and resp.content_type == "application/json"
    return resp.get_json()


def operations(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def test_the_document_is_valid_openapi_3_1(doc):
    validate(doc)
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == VERSION


def test_every_route_the_app_serves_is_documented(doc, make_client):
    app = make_client().application
    served = {
        (m, re.sub(r"<(?:[^:>]+:)?(\w+)>", r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        if rule.endpoint not in ("static", "docs.openapi", "docs.page_", "docs.asset")
        for m in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert operations(doc) == served


def test_a_route_without_an_operation_fails_the_build():
    app = Flask("x")
    app.add_url_rule("/new", "mine.new", lambda: "")
    with pytest.raises(UndocumentedRoute, match="/new"):
        build(app, VERSION)


def test_the_field_sets_are_the_routes_own():
    props = lambda schema: set(schema["properties"])  # noqa: E731
    assert props(schemas.OPENAI_EMBEDDINGS_REQUEST) == openai_compat._FIELDS
    assert props(schemas.OPENAI_COMPLETIONS_REQUEST) == openai_generate._FIELDS["completions"]
    assert props(schemas.OPENAI_CHAT_REQUEST) == openai_generate._FIELDS["chat"]
    assert props(schemas.SEED_GENERATE_REQUEST) == seed._FIELDS["generate"]
    assert props(schemas.SEED_CHAT_REQUEST) == seed._FIELDS["chat"]
    assert schemas.OPENAI_COMPLETIONS_REQUEST["properties"]["n"]["maximum"] == openai_generate.MAX_CHOICES


def reply_schema(doc: dict, method: str, path: str, status: int) -> dict:
    return doc["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]


V2_INPUT = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}


@pytest.mark.parametrize(
    "method, url, path, body, status",
    [
        ("post", "/infer/double", "/infer/{model}", {"x": [1, 2, 3]}, 200),
        ("post", "/infer", "/infer", {"texts": ["a", "b"], "models": ["embed", "shout"]}, 200),
        ("post", "/infer/double", "/infer/{model}", {"x": "not numbers"}, 400),
        ("post", "/infer/nope", "/infer/{model}", {"x": [1]}, 404),
        ("get", "/v2", "/v2", None, 200),
        ("get", "/v2/models/double", "/v2/models/{model}", None, 200),
        ("post", "/v2/models/double/infer", "/v2/models/{model}/infer", V2_INPUT, 200),
        ("post", "/v2/models/double/infer", "/v2/models/{model}/infer", {"inputs": []}, 400),
        ("get", "/v2/models/nope", "/v2/models/{model}", None, 404),
        ("get", "/v1/models", "/v1/models", None, 200),
        ("get", "/v1/models/embed", "/v1/models/{model}", None, 200),
        ("post", "/v1/embeddings", "/v1/embeddings", {"model": "embed", "input": ["hi", "there"]}, 200),
        ("post", "/v1/embeddings", "/v1/embeddings", {"model": "embed", "input": "hi", "encoding_format": "base64"},
         200),
        ("post", "/v1/embeddings", "/v1/embeddings", {"model": "embed"}, 400),
        ("post", "/v1/completions", "/v1/completions", {"model": "double", "prompt": "hi"}, 400),
        ("post", "/generate", "/generate", {"prompt": "hi", "model": "double"}, 400),
    ],
)  # fmt: skip
def test_replies_follow_their_documented_schema(doc, client, method, url, path, body, status):
    resp = getattr(client, method)(url, **({"json": body} if body is not None else {}))
    assert resp.status_code == status, resp.get_data()[:300]
    jsonschema.Draft202012Validator(reply_schema(doc, method, path, status)).validate(resp.get_json())


def test_each_protocol_documents_its_own_error_shape(doc):
    assert reply_schema(doc, "post", "/infer", 413) == schemas.NATIVE_ERROR
    assert reply_schema(doc, "post", "/v2/models/{model}/infer", 413) == schemas.V2_ERROR
    assert reply_schema(doc, "post", "/v1/embeddings", 413) == schemas.OPENAI_ERROR
    infer = doc["paths"]["/infer"]["post"]
    assert {"application/json", "application/x-binserve-framed", "application/x-binserve-pickle"} <= set(
        infer["requestBody"]["content"]
    )
    assert infer["security"] == [{"bearer": []}, {}]
    assert doc["paths"]["/update_model"]["post"]["security"] == [{"admin": []}]


def test_the_readme_routes_table_lists_exactly_the_documented_routes(doc):
    text = Path("README.md").read_text()
    table = text[text.index("| route | what it does |") :].split("\n\n", 1)[0]
    cells = [row.split("|")[1] for row in table.splitlines()[2:]]
    listed = {(m, p) for cell in cells for m, p in re.findall(r"`(GET|POST) (/[^`]*)`", cell)}
    assert listed - {("GET", "/openapi.json")} == operations(doc)


MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"model": "lm", "prompt": "the quick", "max_tokens": 4, "logprobs": 2}),
        ("/v1/chat/completions", {"model": "lm", "messages": MESSAGES, "max_tokens": 4, "n": 2}),
        ("/generate", {"model": "lm", "prompt": "the quick", "max_tokens": 4}),
        ("/chat", {"model": "lm", "messages": MESSAGES, "max_tokens": 4}),
    ],
)
def test_generation_replies_follow_their_documented_schema(doc, lm_manager, make_client, path, body):
    client = make_client()
    if lm_manager.backend == "openvino" and body.get("logprobs"):
        body = {**body, "logprobs": 0}  # the chosen token's only: OpenVINO GenAI gives no alternatives
    resp = client.post(path, json=body)
    assert resp.status_code == 200, resp.get_data()[:300]
    jsonschema.Draft202012Validator(reply_schema(doc, "post", path, 200)).validate(resp.get_json())
    for route in ("/stats", "/health"):
        jsonschema.Draft202012Validator(reply_schema(doc, "get", route, 200)).validate(client.get(route).get_json())


def test_the_docs_page_loads_swagger_ui_from_this_server(make_client):
    client = make_client()
    page = client.get("/docs")
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    html = page.get_data(as_text=True)
    assert "://" not in html  # nothing from a CDN: every file from this server
    for src in re.findall(r'(?:src|href)="([^"]+)"', html):
        asset = client.get("/" + src)
        assert asset.status_code == 200 and len(asset.get_data()) > 0, src
    assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").get_data(as_text=True)[:200_000]
    assert 'url: "openapi.json"' in client.get("/docs/assets/init.js").get_data(as_text=True)
    assert client.get("/docs/assets/swagger-editor-bundle.js").status_code == 404  # only what the page loads
    assert client.get("/docs/assets/..%2fcore.py").status_code == 404


def test_the_docs_page_can_be_turned_off_and_the_document_stays(make_client):
    client = make_client(docs=False)
    assert client.get("/docs").status_code == 404 and client.get("/docs/assets/init.js").status_code == 404
    assert client.get("/openapi.json").status_code == 200
