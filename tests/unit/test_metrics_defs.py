"""The metric definitions: naming rules, single-process exposition, and the dashboard's queries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from binserve.observability import metrics

DEFINED = {
    m._name: m for m in vars(metrics).values() if isinstance(m, (metrics.Counter, metrics.Gauge, metrics.Histogram))
}


#: the Flask card's own metrics (seed 004), kept under its names so its dashboards read binserve
CARD = {"inference_requests": Counter, "inference_latency_seconds": Histogram}


def test_names_follow_prometheus_conventions():
    for name, m in DEFINED.items():
        assert name.startswith("binserve_") or isinstance(m, CARD[name]), name
        if isinstance(m, Histogram):
            assert name.endswith(("_seconds", "_samples", "_ratio", "_bytes")), name
        if isinstance(m, Counter):
            assert not name.endswith("_total")  # prometheus_client appends _total to counters itself


def test_single_process_exposition_parses():
    metrics.REQUESTS.labels("unit", "200", "native").inc()
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert "binserve_requests_total" in names
    # the card's names, unlabelled, as its `Counter(...)` and `Histogram(...)` export them
    assert {"inference_requests_total", "inference_latency_seconds_bucket", "inference_latency_seconds_count"} <= names
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert all(s.labels == {} for s in families["inference_requests"].samples)


def test_dashboard_queries_only_defined_metrics():
    dash = json.loads((Path(__file__).parents[2] / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(binserve_[a-z_]+)", e)}
    exported = set()
    for name, m in DEFINED.items():
        if isinstance(m, Counter):
            exported.add(name + "_total")
        elif isinstance(m, Histogram):
            exported |= {name + s for s in ("_bucket", "_sum", "_count")}
        else:
            exported.add(name)
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"] for p in dash["panels"])
    for topic in ("status", "p99", "Queue time", "batch size", "Queue depth", "version", "GPU memory"):
        assert topic.lower() in titles.lower(), topic


def test_the_backlog_gauge_is_queued_work_times_the_recent_cost():
    from prometheus_client import REGISTRY

    from binserve.observability.metrics import BatchMetrics, GenerationMetrics

    def backlog(model):
        return REGISTRY.get_sample_value("binserve_queue_backlog_seconds", {"model": model})

    m = BatchMetrics("backlog-test")
    m.queue_depth(10)
    assert backlog("backlog-test") == 0.0  # no batch ran yet: no cost known
    m.batch(8, 0, 0, 0.4)  # 50 ms a sample
    assert backlog("backlog-test") == pytest.approx(10 * 0.05)
    m.queue_depth(40)
    assert backlog("backlog-test") == pytest.approx(2.0)
    m.batch(4, 0, 0, 0.4)  # 100 ms a sample: the recent cost moves a fifth of the way
    assert backlog("backlog-test") == pytest.approx(40 * (0.8 * 0.05 + 0.2 * 0.1))
    m.queue_depth(0)
    assert backlog("backlog-test") == 0.0

    g = GenerationMetrics("backlog-gen")
    for _ in range(2):  # two sequences of 4 tokens, 10 ms apart
        g.token(0.02, None)
        for _ in range(3):
            g.token(None, 0.01)
    g.counts(2, 6)  # 6 waiting, 2 at a time, each ~4 tokens x 10 ms
    assert backlog("backlog-gen") == pytest.approx(6 * (0.01 * 8 / 2) / 2)
    g.counts(2, 0)
    assert backlog("backlog-gen") == 0.0
