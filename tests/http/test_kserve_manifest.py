"""deploy/kserve/inferenceservice.yaml is a valid KServe InferenceService, and what it tells KServe
about the container (its port, its V2 health routes, its settings) is what the server does.

KServe's CRD schema (v1beta1) is vendored in deploy/kserve/schema/ (see its README); it is checked
strictly, as `kubectl apply --validate=strict` does: a field the schema does not define is an error
(Kubernetes would otherwise drop it silently, and a typo'd probe or limit would vanish).
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from binserve.config import ServerConfig

MANIFEST = Path("deploy/kserve/inferenceservice.yaml")
SCHEMA = Path("deploy/kserve/schema/inferenceservice-v1beta1.json.gz")


def strict(schema):
    """The CRD's structural schema with unknown fields refused where Kubernetes would prune them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator():
    schema = strict(json.loads(gzip.decompress(SCHEMA.read_bytes())))
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def isvc():
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return doc


def errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_manifest_validates_against_kserves_crd_schema(validator, isvc):
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert errors(validator, isvc) == []


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("spec", "predictor", "containers", 0, "readinesProbe"), {}, "Additional properties"),  # a typo
        (("spec", "predictor", "minReplicas"), "two", "is not of type 'integer'"),
        (("spec", "predictor", "containers", 0, "ports", 0, "containerPort"), None, "None is not of type"),
    ],
)
def test_the_schema_check_refuses_what_kubernetes_would_drop_or_reject(validator, isvc, path, value, expected):
    broken = copy.deepcopy(isvc)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    found = errors(validator, broken)
    assert any(expected in e for e in found), found


def test_the_container_is_what_kserve_looks_for(isvc):
    pred = isvc["spec"]["predictor"]
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container"  # KServe's storage initializer and its defaults find it by name
    (port,) = c["ports"]  # Knative routes to one port
    assert port["name"] in ("http1", "h2c")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PROTOCOL"] == "v2"
    assert env["BINSERVE_MODELS"].endswith(":/mnt/models")  # where STORAGE_URI is downloaded to
    config = ServerConfig.from_env({k: v for k, v in env.items() if v is not None})  # every setting parses
    assert config.port == 8000 and config.admin_port == 0  # the image's port, and no second one
    assert port["containerPort"] == config.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == port["containerPort"], probe
    grace = pred["terminationGracePeriodSeconds"]
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert grace > pre_stop + config.graceful_timeout_s  # a drain is never cut short by SIGKILL


def test_every_binserve_variable_names_a_setting(isvc):
    names = {f"BINSERVE_{f.name.upper()}" for f in dataclasses.fields(ServerConfig)}
    (c,) = isvc["spec"]["predictor"]["containers"]
    used = {e["name"] for e in c["env"] if e["name"].startswith("BINSERVE_")}
    assert used <= names, used - names


def test_the_probes_answer_as_kserve_expects(isvc, make_client, manager):
    (c,) = isvc["spec"]["predictor"]["containers"]
    client = make_client()
    ready, live = c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]
    assert c["startupProbe"]["httpGet"]["path"] == ready
    assert client.get(ready).status_code == 200 and client.get(live).status_code == 200
    manager.ready = False  # loading: not ready, but alive (not restarted)
    assert client.get(ready).status_code == 503 and client.get(live).status_code == 200
    manager.ready = True
    manager.start_draining()  # SIGTERM: out of the endpoints before the listener closes
    assert client.get(ready).status_code == 503 and client.get(live).status_code == 200
