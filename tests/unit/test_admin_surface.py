"""What the admin token cannot do: run untrusted code, follow symlinks out of the import root, leave
files behind; reports that keep replicas apart; CPU limits read from a (simulated) cgroup; the
metrics directory folded down when workers die."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from binserve.process.coreshare import cgroup_cpu_limit
from binserve.serving.repository import ModelRepository
from models.base import AdapterOptions
from models.registry import ModelSpec, load_model
from models.torch_module import UntrustedModelCode, trusted_class

# --- model code only from trusted packages --------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "subprocess:call",
        "os:system",
        "builtins:eval",
        "torch.nn:Linear",  # a real nn.Module, but not from a trusted package
        "models.torch_module:importlib",  # a module re-exported by a trusted one
        "models.registry:ModelSpec",  # trusted, but not an nn.Module
        "models_evil.x:Net",  # a prefix of the name is not a package prefix
        "models.examples.policy",
        "../models/x:Net",
        "",
    ],
)
def test_untrusted_classes_are_refused(spec):
    with pytest.raises(UntrustedModelCode, match="trusted packages \\['models'\\]"):
        trusted_class(spec, ("models",))


def test_the_module_is_not_even_imported(tmp_path, monkeypatch):
    sentinel = tmp_path / "imported"
    (tmp_path / "sneaky_mod.py").write_text(f"open({str(sentinel)!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UntrustedModelCode):
        trusted_class("sneaky_mod:Net", ("models",))
    assert not sentinel.exists() and "sneaky_mod" not in sys.modules


def test_trusted_class_is_returned():
    from models.examples.policy import PolicyNet

    assert trusted_class("models.examples.policy:PolicyNet", ("models",)) is PolicyNet


@pytest.mark.parametrize("trusted", [("models",), ("models.example_policy",)])
def test_manifests_naming_the_examples_old_modules_still_load(trusted):
    """The example writers moved under models/examples/; a repository written before names the old module."""
    from models.examples.policy import PolicyNet
    from models.examples.resnet import ResNetPolicy

    assert trusted_class("models.example_policy:PolicyNet", trusted) is PolicyNet
    assert trusted_class("models.example_resnet:ResNetPolicy", ("models",)) is ResNetPolicy
    with pytest.raises(UntrustedModelCode):  # the old name is trusted, the class's real home is not
        trusted_class("models.example_resnet:ResNetPolicy", ("models.example_policy",))


def test_a_manifest_that_names_a_command_never_runs_it(tmp_path):
    sentinel = tmp_path / "ran"
    model_dir = tmp_path / "version"
    model_dir.mkdir()
    manifest = {
        "class": "subprocess:call",
        "init_args": {"args": ["touch", str(sentinel)]},
        "inputs": {"x": {"dtype": "float32", "shape": [2]}},
    }
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UntrustedModelCode, match="'subprocess:call' is refused"):
        load_model(ModelSpec("m", "torch_module", str(model_dir)), torch.device("cpu"), AdapterOptions())
    assert not sentinel.exists()


def test_weights_must_be_a_safetensors_file_in_the_directory(tmp_path):
    manifest = json.loads(Path("models/policy_v1/manifest.json").read_text())
    for weights in ("../policy_v1/model.safetensors", "model.pt", "/etc/passwd"):
        d = tmp_path / weights.replace("/", "_")
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({**manifest, "weights": weights}))
        with pytest.raises(ValueError, match="must name a .safetensors file"):
            load_model(ModelSpec("p", "torch_module", str(d)), torch.device("cpu"))


# --- confined imports ------------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    r = ModelRepository(tmp_path / "repo", replica="r1")
    r.register(ModelSpec("m", "torch_module", str(Path("models/policy_v1").resolve())))
    return r


@pytest.fixture
def root(tmp_path) -> Path:
    d = tmp_path / "imports"
    (d / "good" / "sub").mkdir(parents=True)
    (d / "good" / "manifest.json").write_text("{}")
    (d / "good" / "sub" / "weights.bin").write_bytes(b"w" * 100)
    return d


def leftovers(repo: ModelRepository) -> list[str]:
    return sorted(p.name for p in (repo.root / "m").iterdir() if p.name not in ("1", "CURRENT", "CONFIGURED", ".lock"))


def test_an_import_copies_regular_files(repo, root):
    version = repo.import_version("m", str(root / "good"), "torch_module", root, 10_000)
    assert version == "2"
    assert (repo.root / "m" / "2" / "sub" / "weights.bin").read_bytes() == b"w" * 100
    assert json.loads((repo.root / "m" / "2" / "binserve.json").read_text()) == {"adapter": "torch_module"}
    assert repo.import_version("m", "good", "torch_module", root, 10_000) == "3"  # relative to the root


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda root: (root / "good" / "etc").symlink_to("/etc"), "is a symlink"),
        (lambda root: (root / "good" / "passwd").symlink_to("/etc/passwd"), "is a symlink"),
        (lambda root: (root / "good" / "loop").symlink_to(root / "good"), "is a symlink"),
        (lambda root: os.mkfifo(root / "good" / "pipe"), "not a regular file"),
        (lambda root: (root / "good" / "big").write_bytes(b"x" * 20_000), "over the 10000-byte limit"),
    ],
    ids=["dir symlink", "file symlink", "symlink loop", "fifo", "too big"],
)
def test_bad_imports_are_refused_and_leave_nothing(repo, root, make, match):
    make(root)
    with pytest.raises(ValueError, match=match):
        repo.import_version("m", str(root / "good"), "torch_module", root, 10_000)
    assert leftovers(repo) == [], "staging or a partial version stayed on disk"
    assert repo.versions("m") == ["1"]


@pytest.mark.parametrize("where", ["outside", "via symlink", "dotdot"])
def test_imports_only_from_under_the_import_root(repo, root, tmp_path, where):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text("{}")
    source = {
        "outside": str(outside),
        "via symlink": str(root / "link"),
        "dotdot": str(root / ".." / "outside"),
    }[where]
    (root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="not a directory under the import root"):
        repo.import_version("m", source, "torch_module", root, 10_000)
    assert leftovers(repo) == []


def test_a_refused_version_can_be_removed_but_not_the_current_one(repo, root):
    v = repo.import_version("m", str(root / "good"), "torch_module", root, 10_000)
    repo.remove_version("m", v)
    assert repo.versions("m") == ["1"]
    with pytest.raises(ValueError, match="is current"):
        repo.remove_version("m", "1")


# --- reports per replica ---------------------------------------------------------------------------


def test_two_replicas_with_the_same_pids_keep_their_reports_apart(tmp_path):
    spec = ModelSpec("m", "torch_module", str(Path("models/policy_v1").resolve()))
    a, b = ModelRepository(tmp_path, replica="pod-a"), ModelRepository(tmp_path, replica="pod-b")
    a.register(spec)
    for pid in (1, 7):  # every pod numbers its processes from 1
        a.report("m", pid, "1")
        b.report("m", pid, "2")
    assert a.workers("m", 60) == {"pod-a:1": "1", "pod-a:7": "1", "pod-b:1": "2", "pod-b:7": "2"}
    b.forget("m", 7)  # pod-b's worker 7 exits
    assert set(a.workers("m", 60)) == {"pod-a:1", "pod-a:7", "pod-b:1"}


def test_pruning_never_removes_another_replicas_report(tmp_path):
    spec = ModelSpec("m", "torch_module", str(Path("models/policy_v1").resolve()))
    a, b = ModelRepository(tmp_path, replica="a"), ModelRepository(tmp_path, replica="a_b")
    a.register(spec)
    a.report("m", 1, "1")
    b.report("m", 1, "1")
    old = 1_000_000_000
    for f in (tmp_path / "m" / ".workers").glob("*.json"):
        os.utime(f, (old, old))
    assert a.workers("m", max_age_s=1) == {}  # both stale
    assert sorted(f.name for f in (tmp_path / "m" / ".workers").iterdir()) == ["a_b_1.json"]


# --- threads follow the container's CPU limit --------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota(tmp_path):
    write(tmp_path / "proc", "0::/kubepods/pod1/ctr\n")
    write(tmp_path / "fs" / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    write(tmp_path / "fs" / "kubepods" / "pod1" / "cpu.max", "250000 100000\n")  # the pod's limit: 2.5 CPUs
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(tmp_path / "proc")) == 2.5
    write(tmp_path / "fs" / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(tmp_path / "proc")) is None


def test_cgroup_v1_quota(tmp_path):
    write(tmp_path / "proc", "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "fs" / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "200000\n")
    write(tmp_path / "fs" / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(tmp_path / "proc")) == 2.0
    write(tmp_path / "fs" / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(tmp_path / "proc")) is None


def test_threads_per_worker_follow_the_quota(monkeypatch):
    from binserve.config import ServerConfig
    from binserve.process import coreshare, runtime

    monkeypatch.setattr(coreshare.os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core node
    monkeypatch.setattr(coreshare, "cgroup_cpu_limit", lambda: 2.0)  # a 2-CPU pod
    assert runtime.usable_cores() == 2 and coreshare.worker_count(0) == 2
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(ServerConfig(workers=1)) == 2 and runtime.thread_counts() == [2]
        # four workers share the pod's 2 CPUs: a lone batch gets both, concurrent ones one each
        assert runtime.configure_threads(ServerConfig(workers=4)) == 2 and runtime.thread_counts() == [2, 1]
        assert runtime.configure_threads(ServerConfig(workers=4, torch_threads=1)) == 1
    finally:
        runtime.configure_threads(ServerConfig(torch_threads=before))
    monkeypatch.setattr(coreshare, "cgroup_cpu_limit", lambda: 0.5)
    assert runtime.usable_cores() == 1 and coreshare.worker_count(0) == 1


def test_reports_can_live_beside_a_read_only_repository(tmp_path):
    spec = ModelSpec("m", "torch_module", str(Path("models/policy_v1").resolve()))
    writer = ModelRepository(tmp_path / "repo", replica="writer")
    writer.register(spec)
    replica = ModelRepository(tmp_path / "repo", replica="pod-a", report_root=tmp_path / "status")
    replica.report("m", 3, "1")
    assert not (tmp_path / "repo" / "m" / ".workers").exists()  # nothing written into the repository
    assert ModelRepository(tmp_path / "repo", report_root=tmp_path / "status").workers("m", 60) == {"pod-a:3": "1"}


def test_an_update_waits_for_a_worker_that_is_only_late_with_its_report_not_for_one_that_is_gone(tmp_path):
    spec = ModelSpec("m", "torch_module", str(Path("models/policy_v1").resolve()))
    a, b = ModelRepository(tmp_path, replica="pod-a", poll_s=1.0), ModelRepository(tmp_path, replica="pod-b")
    a.register(spec)
    a.report("m", 7, "1")
    b.report("m", 7, "1")
    expected = set(a.workers("m"))  # both live when the update began
    a.report("m", 7, "2")
    late = a.live_age_s + 2  # pod-b missed its refresh for a few seconds (busy loading the new version)
    report_b = next((tmp_path / "m" / ".workers").glob("pod-b_*.json"))
    os.utime(report_b, (time.time() - late, time.time() - late))
    assert a.serving_everywhere("m", "2", expected) == (False, {"pod-a:7": "2"})  # not converged: b is late
    assert a.serving_everywhere("m", "2", set()) == (True, {"pod-a:7": "2"})  # what it said before
    gone = 10 * a.live_age_s + 1  # b was killed: its report will never be refreshed
    os.utime(report_b, (time.time() - gone, time.time() - gone))
    assert a.serving_everywhere("m", "2", expected) == (True, {"pod-a:7": "2"})
    b.report("m", 7, "2")  # b caught up
    assert a.serving_everywhere("m", "2", expected) == (True, {"pod-a:7": "2", "pod-b:7": "2"})


class _Listed:
    """What the directory listing said of an entry: a regular file (before it was swapped)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def is_symlink(self) -> bool:
        return False

    def is_dir(self, follow_symlinks: bool = True) -> bool:
        return False

    def is_file(self, follow_symlinks: bool = True) -> bool:
        return True


@pytest.mark.parametrize(
    "swap, match",
    [
        (lambda path: path.symlink_to("/etc/passwd"), "is a symlink"),
        (lambda path: os.mkfifo(path), "not a regular file"),
    ],
    ids=["symlink", "fifo"],
)
def test_an_entry_swapped_between_listing_and_opening_is_refused(repo, root, monkeypatch, swap, match):
    """The race the listing's checks cannot see: manifest.json is listed as a regular file, then
    replaced (by whoever else writes the import root) before the copy opens it. The open itself
    must refuse a symlink (O_NOFOLLOW) and must neither block on a FIFO nor copy it (O_NONBLOCK,
    then S_ISREG on the opened descriptor)."""
    import shutil
    import threading

    shutil.rmtree(root / "good" / "sub")
    target = root / "good" / "manifest.json"
    listing = os.scandir

    def listed_then_swapped(fd):
        with listing(fd) as it:
            entries = [_Listed(e.name) for e in it]
        target.unlink()
        swap(target)
        return _Entries(entries)

    monkeypatch.setattr(os, "scandir", listed_then_swapped)
    outcome: list[BaseException | str] = []

    def run():
        try:
            outcome.append(repo.import_version("m", str(root / "good"), "torch_module", root, 10_000))
        except Exception as exc:  # what the admin route turns into a 400
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # blocked opening the FIFO: release it so the thread can end
        os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail("the import blocked opening a FIFO")
    monkeypatch.undo()
    (result,) = outcome
    assert isinstance(result, ValueError) and match in str(result), result
    assert leftovers(repo) == [] and repo.versions("m") == ["1"]


class _Entries(list):
    """A list usable as scandir's context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
