"""The Prometheus rules and the prometheus-adapter rule shipped in deploy/prometheus, and the HPA
that reads the adapter's metric: promtool runs the rules' own unit tests, the adapter's query is
rendered as the adapter renders it and checked by promtool, and the metric it names is one
binserve exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from binserve.observability import metrics

RULES = Path("deploy/prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian 'prometheus'; .ci/run)")


def adapter_query(labels: str = 'namespace="default",pod="binserve-0"', group: str = "pod") -> str:
    """The adapter rule's metricsQuery as prometheus-adapter fills it in for one pod."""
    (rule,) = yaml.safe_load((RULES / "adapter-rules.yaml").read_text())["rules"]
    series = rule["seriesQuery"].split("{", 1)[0]
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", labels)
        .replace("<<.GroupBy>>", group)
    )


@needs_promtool
def test_the_rules_pass_their_promtool_tests():
    run = subprocess.run([PROMTOOL, "test", "rules", "binserve-rules.test.yaml"], cwd=RULES,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_the_adapter_rule_names_an_exported_metric_with_a_valid_query(tmp_path):
    (rule,) = yaml.safe_load((RULES / "adapter-rules.yaml").read_text())["rules"]
    name = rule["seriesQuery"].split("{", 1)[0]
    assert name == metrics.QUEUE_BACKLOG._name == rule["name"]["as"]
    assert {"namespace", "pod"} == set(rule["resources"]["overrides"])
    # promtool checks PromQL only inside rule files: the rendered query as a recording rule
    check = tmp_path / "adapter.yaml"
    check.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "pod:binserve_queue_backlog_seconds:max1m", "expr": adapter_query()}]}]}))  # fmt: skip
    run = subprocess.run([PROMTOOL, "check", "rules", str(check)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_hpa_scales_on_queued_work_with_cpu_as_the_fallback():
    (hpa,) = [
        d
        for d in yaml.safe_load_all(Path("deployment.yaml").read_text())
        if d and d["kind"] == "HorizontalPodAutoscaler"
    ]
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    (rule,) = yaml.safe_load((RULES / "adapter-rules.yaml").read_text())["rules"]
    assert kinds["Pods"]["pods"]["metric"]["name"] == rule["name"]["as"]
    assert kinds["Pods"]["pods"]["target"]["type"] == "AverageValue"
    assert kinds["Resource"]["resource"]["name"] == "cpu"


def test_every_metric_the_rules_read_is_one_binserve_exports():
    exported = set()
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.describe():
                exported |= {family.name, family.name + "_total", family.name + "_bucket"}
    groups = yaml.safe_load((RULES / "binserve-rules.yaml").read_text())["groups"]
    exprs = [rule["expr"] for g in groups for rule in g["rules"]]
    read = {m for e in exprs for m in re.findall(r"(?<![:\w])(binserve_[a-z_]+)", e)}
    assert read and read <= exported, read - exported
    assert "binserve_ready" in read  # a replica not ready is alerted on, not only one not scraped
