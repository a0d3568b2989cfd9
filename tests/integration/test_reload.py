"""Hot reload on real Gunicorn with 2 workers: zero failed requests, convergence, refusal, auth, memory."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertModel

from models.registry import default_minilm_path
from request_tools import InferenceClient
from tests.serverproc import ServerProcess, status_kib

ADMIN = "admin-secret"
TEXTS = [f"reload test sentence {i} about {'rivers' if i % 2 else 'markets'}" for i in range(16)]


def copy_tokenizer_and_config(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copy(f, dst / f.name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", dst / "1_Pooling")


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, Path]:
    """Model directories: v2 is MiniLM with perturbed weights; corrupt and wrong-shape ones are bad."""
    root = tmp_path_factory.mktemp("versions")
    src = Path(default_minilm_path())
    v2 = root / "v2"
    copy_tokenizer_and_config(src, v2)
    gen = torch.Generator().manual_seed(0)
    weights = {
        k: (t + 0.05 * t.std() * torch.randn(t.shape, generator=gen)) if t.is_floating_point() and t.numel() > 1 else t
        for k, t in load_file(src / "model.safetensors").items()
    }
    save_file(weights, v2 / "model.safetensors")
    corrupt = root / "corrupt"
    copy_tokenizer_and_config(src, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64 + b"not safetensors")
    small = root / "small"
    copy_tokenizer_and_config(src, small)
    cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    BertModel(cfg).save_pretrained(small, safe_serialization=True)
    return {"v2": v2, "corrupt": corrupt, "small": small}


@pytest.fixture(scope="module")
def reload_server(versions):
    root = versions["v2"].parent  # path imports only from under the import root
    # the response cache is on, so that the reload test also shows that no reply of the old
    # version is ever answered from the cache after the new one serves
    with ServerProcess(
        workers=2, admin_token=ADMIN, repository_poll_ms=200, import_root=root, response_cache_bytes=8 << 20
    ) as srv:
        yield srv


def pid_of(worker: str) -> int:
    """The pid in a worker report key, "replica:pid"."""
    return int(worker.rsplit(":", 1)[1])


def update(srv, token=ADMIN, **body) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{srv.base_url}/update_model", json={"model": "minilm", **body}, headers=headers, timeout=300)


def worker_rss(workers) -> int:
    return sum(status_kib(pid, "VmRSS") * 1024 for pid in map(pid_of, workers))


def test_reload_under_load_drops_nothing_and_every_reply_matches_its_version(reload_server, versions):
    srv = reload_server
    refs = {
        "1": SentenceTransformer(default_minilm_path(), device="cpu").encode(TEXTS),
        "2": SentenceTransformer(str(versions["v2"]), device="cpu").encode(TEXTS),
    }
    cross = (refs["1"] * refs["2"]).sum(1) / np.linalg.norm(refs["1"], axis=1) / np.linalg.norm(refs["2"], axis=1)
    assert cross.max() < 0.995, "the two versions must differ measurably"

    r = update(srv, path=str(versions["v2"]))  # import as version 2, and switch to it
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "2" and r.json()["converged"] and len(r.json()["workers"]) == 2

    stop = threading.Event()
    failures, seen, mismatches, cached = [], {"1": 0, "2": 0}, [], {"hit": 0, "miss": 0}
    lock = threading.Lock()

    def client_loop(k: int):
        with InferenceClient(srv.base_url, retries=0) as client:
            i = k
            while not stop.is_set():
                text_idx = i % len(TEXTS)
                try:
                    reply = client.request({"texts": [TEXTS[text_idx]]})
                except Exception as exc:  # any failure at all is what this test is about
                    with lock:
                        failures.append(repr(exc))
                    continue
                ref = refs[reply.model_version][text_idx]
                emb = reply.outputs["embeddings"][0]
                cos = float(emb @ ref / np.linalg.norm(emb) / np.linalg.norm(ref))
                with lock:
                    seen[reply.model_version] += 1
                    cached[reply.headers["X-Cache"]] += 1
                    if cos < 0.999:  # the accuracy gate of the engines serving it
                        mismatches.append((reply.model_version, cos))
                i += 16

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    try:
        rss_after_first = None
        for n in range(10):
            target = "1" if n % 2 == 0 else "2"
            r = update(srv, version=target)
            assert r.status_code == 200, r.text
            assert r.json()["converged"] and set(r.json()["workers"].values()) == {target}
            if n == 0:
                rss_after_first = worker_rss(r.json()["workers"])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert mismatches == []
    assert seen["1"] > 0 and seen["2"] > 0
    assert cached["hit"] > 0 and cached["miss"] > 0, cached  # hits were answered, and matched their version
    # eleven more reloads without load, ending on version 1 again: memory must be back near the level
    # after the first. The same version at both ends: the two versions' plans may differ (engines are
    # timed at load), and with them their footprints, by ~8% on one machine.
    for n in range(11):
        r = update(srv, version="1" if n % 2 == 0 else "2")
        assert r.status_code == 200, r.text
    assert r.json()["version"] == "1"
    rss_after_20 = worker_rss(r.json()["workers"])
    assert rss_after_20 <= 1.10 * rss_after_first, (rss_after_first, rss_after_20)


@pytest.mark.parametrize("bad", ["corrupt", "small"])
def test_bad_version_is_refused_and_traffic_continues(reload_server, versions, bad):
    srv = reload_server
    before = requests.get(f"{srv.base_url}/models", timeout=10).json()["models"][0]["repository_version"]
    r = update(srv, path=str(versions[bad]))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "model_load_failed" and f"version {before} keeps serving" in err["message"]
    if bad == "corrupt":  # named by the weights check before anything loads it
        assert "CorruptWeights: model.safetensors is not a safetensors file" in err["message"], err
    model_dir = srv.repository / "minilm"
    assert not list(model_dir.glob(".import-*")), "an import's staging directory was left behind"
    on_disk = sorted(p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert max(map(int, on_disk)) <= max(int(before), 2), f"the refused version stayed on disk: {on_disk}"
    info = requests.get(f"{srv.base_url}/models", timeout=10).json()["models"][0]
    assert info["repository_version"] == before and info["version"] == before
    out = InferenceClient(srv.base_url).infer({"texts": ["still serving"]})
    assert out["embeddings"].shape == (1, 384)


def test_unknown_version_and_bad_requests(reload_server):
    r = update(reload_server, version="99")
    assert r.status_code == 404 and "no version '99'" in r.json()["error"]["message"]
    r = update(reload_server, version="1", path="/x")
    assert r.status_code == 400 and "exactly one" in r.json()["error"]["message"]
    r = update(reload_server, path="/definitely/not/here")
    assert r.status_code == 400 and "not a directory" in r.json()["error"]["message"]


def test_admin_token_is_required(reload_server):
    before = requests.get(f"{reload_server.base_url}/models", timeout=10).json()["models"][0]["version"]
    assert update(reload_server, token=None, version="1").status_code == 401
    r = update(reload_server, token="wrong", version="1")
    assert r.status_code == 403 and "not valid" in r.json()["error"]["message"]
    assert requests.get(f"{reload_server.base_url}/models", timeout=10).json()["models"][0]["version"] == before


def test_update_is_disabled_without_an_admin_token(server):
    r = requests.post(f"{server.base_url}/update_model", json={"model": "minilm", "version": "1"}, timeout=30)
    assert r.status_code == 403 and "BINSERVE_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_a_restarted_worker_comes_up_on_the_current_version(reload_server, versions):
    import os
    import signal
    import time

    srv = reload_server
    r = update(srv, path=str(versions["v2"]))  # a fresh version, so the test stands alone
    assert r.status_code == 200 and r.json()["converged"], r.text
    current = r.json()["version"]
    victim = pid_of(next(iter(r.json()["workers"])))
    os.kill(victim, signal.SIGKILL)  # Gunicorn's master starts a replacement worker
    deadline = time.monotonic() + 120
    workers: dict = {}
    while time.monotonic() < deadline:
        info = requests.get(f"{srv.base_url}/models", timeout=10).json()
        if not info["ready"]:  # answered by the replacement worker while it loads
            time.sleep(0.2)
            continue
        workers = {pid_of(w): v for w, v in info["models"][0]["workers"].items()}
        if len(workers) == 2 and victim not in workers:
            break
        time.sleep(0.2)  # polling the workers' reports, refreshed every 200 ms
    assert len(workers) == 2 and victim not in workers, workers
    assert set(workers.values()) == {current}
