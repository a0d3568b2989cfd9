"""deployment.yaml keeps its hardening: what kubernetes-validate cannot know we want."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DOCS = [d for d in yaml.safe_load_all(Path("deployment.yaml").read_text()) if d]
BY_NAME = {(d["kind"], d["metadata"]["name"]): d for d in DOCS}
DEPLOYMENTS = [d for d in DOCS if d["kind"] == "Deployment"]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_pods_are_locked_down(dep):
    pod = dep["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert (
            sc["readOnlyRootFilesystem"]
            and not sc["allowPrivilegeEscalation"]
            and sc["capabilities"]["drop"] == ["ALL"]
        )
        name, _, tag = c["image"].partition(":")
        assert name == "binserve" and tag and tag != "latest", c["image"]
        assert env_of(c)["BINSERVE_ADMIN_PORT"]["value"] == "9000"
        assert "limits" in c["resources"] and "cpu" in c["resources"]["limits"]  # threads follow it
    for v in pod["volumes"]:
        if "emptyDir" in v:
            assert v["emptyDir"].get("sizeLimit"), v


def test_only_the_admin_deployment_writes_the_repository_and_takes_updates():
    server = BY_NAME[("Deployment", "binserve")]["spec"]["template"]["spec"]
    admin = BY_NAME[("Deployment", "binserve-admin")]["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in server["containers"][0]["volumeMounts"]}
    assert mounts["models"].get("readOnly") is True
    assert next(v for v in server["volumes"] if v["name"] == "models")["persistentVolumeClaim"]["readOnly"] is True
    assert "BINSERVE_ADMIN_TOKEN" not in env_of(server["containers"][0])
    assert env_of(server["containers"][0])["BINSERVE_REPORT_DIR"]["value"] == "/status"
    admin_env = env_of(admin["containers"][0])
    assert admin_env["BINSERVE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "binserve-admin"
    assert not any(m.get("readOnly") for m in admin["containers"][0]["volumeMounts"] if m["name"] == "models")
    auth = env_of(server["containers"][0])["BINSERVE_AUTH_TOKEN"]
    assert auth["valueFrom"]["secretKeyRef"]["name"] == "binserve-auth"


def test_the_inference_service_exposes_no_admin_port():
    svc = BY_NAME[("Service", "binserve")]["spec"]
    assert [p["targetPort"] for p in svc["ports"]] == ["http"]
    assert svc["selector"]["app.kubernetes.io/component"] == "server"


def test_network_policy_keeps_the_admin_port_to_admin_clients():
    policy = BY_NAME[("NetworkPolicy", "binserve")]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []
    admin_rule = next(r for r in policy["ingress"] if r["ports"][0]["port"] == 9000)
    assert admin_rule["from"], "the admin port must not be open to every pod"


def test_api_keys_come_from_a_secret_mounted_read_only():
    pod = BY_NAME[("Deployment", "binserve")]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = env_of(c)
    assert env["BINSERVE_API_KEYS_FILE"]["value"] == "/etc/binserve/keys/keys.json"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/binserve/keys")
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "binserve-api-keys"
    assert not volume["secret"].get("optional")  # a pod without its keys must not serve open
    assert env["BINSERVE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_production_serves_no_docs_page():
    (c,) = BY_NAME[("Deployment", "binserve")]["spec"]["template"]["spec"]["containers"]
    assert env_of(c)["BINSERVE_DOCS"]["value"] == "false"
