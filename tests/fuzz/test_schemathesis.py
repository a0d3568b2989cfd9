"""Property-based fuzzing of every route in /openapi.json with Schemathesis, against a real
Gunicorn server serving MiniLM and the tiny causal LM, with auth and admin tokens set.

Bounded: EXAMPLES per operation (a fixed seed, so a run is repeatable), every reply within
DEADLINE_S, each operation within pytest's timeout. Checked on every reply: no 5xx, the status is
one the document lists for the route, the body matches the documented schema for that status and
its Content-Type is a documented one. At the end the server is ready and its worker's RSS grew by
less than RSS_GROWTH_MIB."""

from __future__ import annotations

import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from binserve.api.spec.operations import OPERATIONS
from models.registry import default_minilm_path
from tests.serverproc import ServerProcess, status_kib

EXAMPLES = int(os.environ.get("BINSERVE_FUZZ_EXAMPLES", "50"))
DEADLINE_S = 10.0  # the server's request_timeout_s; a reply later than it (plus slack) fails
SEED = 25
RSS_GROWTH_MIB = 64
TOKEN, ADMIN = "fuzz-inference-token", "fuzz-admin-token"
CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_server(lm_dir):
    models = f"minilm=hf_encoder:{default_minilm_path()},tiny=hf_causal_lm:{lm_dir}"
    with ServerProcess(
        workers=1, models=models, auth_token=TOKEN, admin_token=ADMIN, request_timeout_s=DEADLINE_S
    ) as srv:
        rss = {pid: status_kib(pid, "VmRSS") for pid in srv.worker_pids()}
        yield srv
        # the server outlived the fuzzing: ready, and no worker kept what hostile requests made it build
        assert requests.get(f"{srv.base_url}/readyz", timeout=10).status_code == 200
        assert set(srv.worker_pids()) == set(rss), "a worker died during the fuzzing"
        for pid, before in rss.items():
            grown_mib = (status_kib(pid, "VmRSS") - before) / 1024
            assert grown_mib < RSS_GROWTH_MIB, f"worker {pid} grew {grown_mib:.0f} MiB"


@pytest.fixture(scope="module")
def api(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


def _served(api, endpoint: str, method: str) -> list:
    """The served document's operations of one Flask endpoint (one per path it is routed on)."""
    ops = [r.ok() for r in api.get_all_operations()]
    return [op for op in ops if op.definition.raw["operationId"].startswith(f"{endpoint}.{method}.")]


def _modes(operation) -> list[GenerationMode]:
    """Schema-shaped requests always; schema-breaking ones where there is something to break."""
    raw = operation.definition.raw
    # a plain string path parameter has no wrong value a URL can carry; an enum one has
    plain = [{k: v for k, v in p["schema"].items() if k != "description"} for p in raw.get("parameters", [])]
    negatable = "requestBody" in raw or any(schema != {"type": "string"} for schema in plain)
    return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if negatable else [GenerationMode.POSITIVE]


def _fuzz(operation, mode: GenerationMode, base_url: str, token: str) -> None:
    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,  # each reply's own deadline is checked below; Hypothesis' would count shrinking
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=DEADLINE_S + 5)
        took = response.elapsed  # seconds
        assert took < DEADLINE_S + 2, f"{case.method} {case.formatted_path} took {took:.1f} s"
        case.validate_response(response, checks=CHECKS)

    fuzz()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("endpoint", "method"), [(e, m) for e, ms in OPERATIONS.items() for m in ms])
def test_every_route_answers_as_documented(api, fuzz_server, endpoint, method):
    operations = _served(api, endpoint, method)
    assert operations, f"{method.upper()} {endpoint} is declared but the server's /openapi.json lacks it"
    for operation in operations:
        token = ADMIN if operation.definition.raw.get("security") == [{"admin": []}] else TOKEN
        for mode in _modes(operation):
            _fuzz(operation, mode, fuzz_server.base_url, token)
