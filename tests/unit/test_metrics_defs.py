"""The metric definitions: naming rules, single-process exposition, and the dashboard's queries."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from binserve.observability import metrics

DEFINED = {
    m._name: m for m in vars(metrics).values() if isinstance(m, (metrics.Counter, metrics.Gauge, metrics.Histogram))
}


def test_names_follow_prometheus_conventions():
    for name, m in DEFINED.items():
        assert name.startswith("binserve_")
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
