"""Replicas of the real image behind a real HAProxy under load (tests/replicas/bed.py): a rolling
restart loses nothing, a replica killed mid-load costs only retries and rejoins when ready.

Needs Docker, the image and haproxy: `make replicas-test` builds the image and runs this with
BINSERVE_IMAGE set (CI does, after the image tests); without the variable it is skipped.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import requests
from sentence_transformers import SentenceTransformer

from models.registry import default_minilm_path
from tests.container.test_image import cosines
from tests.promproc import PrometheusProcess
from tests.replicas.bed import IMAGE, TEXTS, HAProxy, Load, Replicas, docker, wait_ready, wait_state
from tests.serverproc import poll

pytestmark = pytest.mark.skipif(not IMAGE, reason="BINSERVE_IMAGE is not set (make replicas-test sets it)")


TOKEN = "replica-bed-admin"


@pytest.fixture(scope="module")
def bed(version_two):
    # beside version 2 under the import root: a copy whose weights file was cut short, as an
    # interrupted upload leaves it
    truncated = version_two.parent / "truncated"
    shutil.copytree(version_two, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    writer = ("-v", f"{version_two.parent}:/imports:ro")
    env = {"BINSERVE_ADMIN_TOKEN": TOKEN, "BINSERVE_IMPORT_ROOT": "/imports"}
    with Replicas(3, writer_args=writer, writer_env=env) as replicas:
        servers = [f"127.0.0.1:{c.port}" for c in replicas.containers]
        with HAProxy(servers) as lb:
            yield replicas, lb


def test_a_rolling_restart_of_every_replica_under_load_fails_no_request_and_prometheus_sees_it(bed):
    """As a Deployment rollout does: one replica at a time gets SIGTERM with its grace period
    (`docker stop -t 30`), comes back, and is ready before the next one goes. A real Prometheus
    scrapes the three every second with binserve's rules loaded, as an operator runs it: all up and
    ready, the recording rules fed by the traffic, each stopped replica seen down with its alert
    pending, and up and ready again once it is back."""
    replicas, lb = bed
    targets = {f"127.0.0.1:{c.port}": {"pod": f"r{i}"} for i, c in enumerate(replicas.containers)}
    downs, seen_down = [], []
    with PrometheusProcess(targets, interval_s=1.0) as prom, Load(lb.url) as load:
        poll(lambda: prom.value('sum(up{job="binserve"})') == 3.0, timeout_s=60)
        poll(lambda: prom.value('count(binserve_ready{job="binserve"} == 1)') == 3.0, timeout_s=30)
        errors, p99 = "model:binserve_request_errors:ratio_rate5m", "model:binserve_request_duration_seconds:p99_5m"
        poll(lambda: prom.query(f'{errors}{{model="minilm"}}') and prom.query(f'{p99}{{model="minilm"}}'), timeout_s=60)
        assert prom.value(f'{errors}{{model="minilm"}}') == 0.0
        assert 0 < prom.value(f'{p99}{{model="minilm"}}') < 10
        assert prom.value('model:binserve_queue_backlog_seconds:sum{model="minilm"}') >= 0
        for i, c in enumerate(replicas.containers):
            instance = f"127.0.0.1:{c.port}"
            pending = f'ALERTS{{alertname="BinserveReplicaDown", alertstate="pending", instance="{instance}"}}'
            t0 = time.monotonic()
            docker("stop", "-t", "30", c.name, timeout=90)
            downs.append(wait_state(lb, f"r{i}", "DOWN", timeout_s=10))
            poll(lambda instance=instance: prom.value(f'up{{instance="{instance}"}}') == 0.0, timeout_s=30)
            seen_down.append(time.monotonic() - t0)
            poll(lambda pending=pending: prom.value(pending) == 1.0, timeout_s=30)
            docker("start", c.name)
            wait_ready(c)
            wait_state(lb, f"r{i}", "UP", timeout_s=30)
            back = int(lb.stats()[f"r{i}"]["stot"])  # it takes load again before the next one goes
            poll(lambda i=i, back=back: int(lb.stats()[f"r{i}"]["stot"]) >= back + 5, timeout_s=30, every_s=0.05)
            ready = f'min(binserve_ready{{instance="{instance}"}})'
            poll(lambda ready=ready: prom.value(ready) == 1.0, timeout_s=60)
            poll(lambda pending=pending: not prom.query(pending), timeout_s=30)
    print(f"\nrolling restart of 3 replicas: {load.summary()}; HAProxy saw each down in "
          f"{', '.join(f'{d:.2f}' for d in downs)} s; Prometheus saw each down (up == 0) "
          f"{', '.join(f'{d:.1f}' for d in seen_down)} s after its `docker stop` began, its alert pending, "
          f"then up and ready again")  # fmt: skip
    assert load.failures == [], load.failures[:5]
    assert load.retried == 0  # the drain delay: nothing was refused or reset, not even once
    assert load.sent > 100
    for i in range(3):  # every replica served after its restart
        assert int(lb.stats()[f"r{i}"]["stot"]) > 0


def test_a_replica_killed_mid_load_costs_retries_not_failures_and_rejoins(bed):
    replicas, lb = bed
    victim = replicas.containers[1]
    with Load(lb.url) as load:
        before = int(lb.stats()["r1"]["stot"])
        # HAProxy's count of requests sent to it: it is taking load
        poll(lambda: int(lb.stats()["r1"]["stot"]) >= before + 5, timeout_s=30, every_s=0.05)
        docker("kill", victim.name)  # SIGKILL: no drain, requests in flight on it are lost
        marked_down = wait_state(lb, "r1", "DOWN", timeout_s=10)
        docker("start", victim.name)
        wait_ready(victim)
        wait_state(lb, "r1", "UP", timeout_s=30)
        rejoined = int(lb.stats()["r1"]["stot"])
        # the rejoined replica takes requests again
        poll(lambda: int(lb.stats()["r1"]["stot"]) > rejoined + 5, timeout_s=30, every_s=0.05)
        served_after = int(lb.stats()["r1"]["stot"]) - rejoined
    print(f"\nSIGKILL of one of 3 replicas: {load.summary()}; HAProxy marked it down in {marked_down:.2f} s, "
          f"it served {served_after} requests after rejoining")  # fmt: skip
    assert load.failures == [], load.failures[:5]
    assert served_after > 5


def test_an_update_on_the_writer_reaches_every_replica_under_load_and_each_reply_names_its_weights(bed, version_two):
    replicas, lb = bed
    writer = replicas.containers[0]
    refs = {
        "1": SentenceTransformer(default_minilm_path(), device="cpu").encode(TEXTS[:1])[0],
        "2": SentenceTransformer(str(version_two), device="cpu").encode(TEXTS[:1])[0],
    }
    with Load(lb.url) as load:
        t0 = time.monotonic()
        r = requests.post(f"{writer.url}/update_model", json={"model": "minilm", "path": "/imports/v2"},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)  # fmt: skip
        converged_s = time.monotonic() - t0
        assert r.status_code == 200, r.text
        body = r.json()
        converged_at = time.monotonic()
        # replies to requests sent after the update converged: at least 50, and some from every replica
        # (leastconn steers the first ones away from a replica whose first batches on the new weights
        # are still slow: all three are not always among the first 50, seen twice on a 2-core machine)
        def after_convergence():
            after = [who for _, who, sent in load.served_by if sent > converged_at]
            return len(after) >= 50 and set(after) == {"r0", "r1", "r2"}

        poll(after_convergence, timeout_s=30, every_s=0.05)
    print(f"\n/update_model on the writer under load: converged={body['converged']} in {converged_s:.1f} s over "
          f"{len(set(w.split(':')[0] for w in body['workers']))} replicas; {load.summary()}")  # fmt: skip
    assert body["version"] == "2" and body["converged"], body
    assert len({w.split(":")[0] for w in body["workers"]}) == 3, body["workers"]
    assert load.failures == [], load.failures[:5]
    # a batch that was running on version 1 when its worker switched still answers with 1; every
    # request sent after the update said it converged is answered by version 2, on every replica
    before = [v for v, _, sent in load.served_by if sent < t0]
    after = [(v, who) for v, who, sent in load.served_by if sent > converged_at]
    assert set(before) == {"1"} and len(after) >= 50
    assert {v for v, _ in after} == {"2"}, [a for a in after if a[0] != "2"][:10]
    assert {who for _, who in after} == {"r0", "r1", "r2"}
    for version, embedding in load.replies:  # the header names the weights that computed the reply
        assert version in refs, version
        other = refs["2" if version == "1" else "1"]
        assert cosines(np.array([embedding]), np.array([refs[version]]))[0] >= 0.9999
        assert cosines(np.array([embedding]), np.array([other]))[0] < 0.9999


def test_a_version_with_a_truncated_weights_file_is_refused_and_every_replica_keeps_serving(bed):
    replicas, lb = bed
    writer = replicas.containers[0]
    info = requests.get(f"{writer.url}/models", timeout=10).json()["models"][0]
    before = info["repository_version"]
    with Load(lb.url) as load:
        t0 = time.monotonic()
        r = requests.post(f"{writer.url}/update_model", json={"model": "minilm", "path": "/imports/truncated"},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)  # fmt: skip
        refused_s = time.monotonic() - t0
        after_refusal = time.monotonic()
        poll(lambda: sum(1 for *_, sent in load.served_by if sent > after_refusal) >= 30, timeout_s=30, every_s=0.05)
    print(f"\n/update_model with a truncated weights file: {r.status_code} in {refused_s:.1f} s; {load.summary()}")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "model_load_failed" and f"version {before} keeps serving" in err["message"], err
    assert "CorruptWeights: model.safetensors is cut short" in err["message"], err  # the file, and how
    assert load.failures == [], load.failures[:5]
    assert {v for v, *_ in load.served_by} == {before}
    # nothing of the refused version on the shared volume: no staging directory, no new version
    listing = docker("exec", writer.name, "ls", "-A", "/models/minilm").split()
    assert not [n for n in listing if n.startswith(".import")], listing
    assert max(int(n) for n in listing if n.isdigit()) == int(before), listing
    for c in replicas.containers:
        assert requests.get(f"{c.url}/models", timeout=10).json()["models"][0]["version"] == before
