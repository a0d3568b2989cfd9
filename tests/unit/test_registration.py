"""A restart serves what its configuration says: ModelRepository.register on a real directory tree."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from binserve.serving import repository as repository_module
from binserve.serving.repository import ModelRepository
from models.registry import ModelSpec


@pytest.fixture
def dirs(tmp_path) -> dict[str, Path]:
    out = {}
    for name in ("A", "B", "C"):
        (tmp_path / "models" / name).mkdir(parents=True)
        out[name] = tmp_path / "models" / name
    return out


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo", replica="r1")


def spec(path: Path, **settings) -> ModelSpec:
    return ModelSpec("topics", "hf_encoder", str(path), settings=settings)


def manifest(repo: ModelRepository, version: str) -> dict:
    return json.loads((repo.root / "topics" / version / "binserve.json").read_text())


def test_a_changed_path_becomes_a_new_current_version(repo, dirs):
    first = repo.register(spec(dirs["A"]))
    assert (first.action, first.version, repo.current("topics")) == ("registered", "1", "1")
    again = repo.register(spec(dirs["A"]))
    assert (again.action, again.version, repo.current("topics")) == ("kept", "1", "1")
    changed = repo.register(spec(dirs["B"]))
    assert (changed.action, changed.version, repo.current("topics")) == ("registered", "2", "2")
    assert manifest(repo, "2") == {"adapter": "hf_encoder", "path": str(dirs["B"].resolve())}
    a, b = dirs["A"].resolve(), dirs["B"].resolve()
    assert changed.message() == f"model topics: configuration names {b}; registered as version 2 (was 1: {a})"
    assert repo.versions("topics") == ["1", "2"]


def test_a_hot_reload_stands_across_restarts_until_the_configuration_changes(repo, dirs, tmp_path):
    repo.register(spec(dirs["A"]))
    repo.register(spec(dirs["B"]))
    imported = repo.import_version("topics", str(dirs["C"]), "hf_encoder", dirs["C"].parent, 1 << 20)
    repo.set_current("topics", imported)  # what /update_model does once every check passed
    kept = repo.register(spec(dirs["B"]))  # a restart with the same configuration
    assert (kept.action, repo.current("topics")) == ("kept", imported)
    assert "version 3, made current since, stays current" in kept.message(repo.current("topics"))
    back = repo.register(spec(dirs["A"]))  # the configuration went back to A: A is served again
    assert (back.action, back.version, repo.current("topics")) == ("switched", "1", "1")
    assert repo.versions("topics") == ["1", "2", "3"]  # an existing version, not a copy of it
    other_adapter = repo.register(ModelSpec("topics", "torch_module", str(dirs["A"])))
    assert (other_adapter.action, other_adapter.version) == ("registered", "4")


def test_a_missing_directory_is_refused_by_name_and_writes_nothing(repo, dirs, tmp_path):
    repo.register(spec(dirs["A"]))
    gone = tmp_path / "models" / "typo"
    with pytest.raises(FileNotFoundError, match=f"{gone} does not exist"):
        repo.register(spec(gone))
    assert (repo.versions("topics"), repo.current("topics")) == (["1"], "1")
    # a configured version whose directory went away is kept: its load names the directory
    dirs["A"].rmdir()
    assert repo.register(spec(dirs["A"])).action == "kept"


def test_settings_follow_the_configuration_on_the_same_version(repo, dirs):
    repo.register(spec(dirs["A"]))
    again = repo.register(spec(dirs["A"], max_batch_size=8))
    assert (again.action, again.version) == ("kept", "1")
    assert manifest(repo, "1")["settings"] == {"max_batch_size": 8}


def test_an_unchanged_configuration_writes_nothing(repo, dirs, monkeypatch):
    """A read-only replica registers the writer's configuration without writing (or locking)."""
    repo.register(spec(dirs["A"]))

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(repository_module, "_atomic_write", refuse)
    monkeypatch.setattr(repo, "lock", refuse)
    assert repo.register(spec(dirs["A"])).action == "kept"
    with pytest.raises(OSError, match="Read-only"):  # a change needs the writer
        repo.register(spec(dirs["B"]))


def test_a_repository_from_before_configured_was_kept_keeps_its_current(repo, dirs):
    repo.register(spec(dirs["A"]))
    repo.register(spec(dirs["B"]))
    repo.set_current("topics", "1")
    (repo.root / "topics" / "CONFIGURED").unlink()  # as an older binserve left it
    kept = repo.register(spec(dirs["B"]))
    assert (kept.action, repo.current("topics")) == ("kept", "1")
    assert (repo.root / "topics" / "CONFIGURED").read_text().strip() == "2"


def test_workers_starting_together_register_one_version(tmp_path, dirs, monkeypatch):
    """Each Gunicorn worker registers the configuration at start: under the lock, one version."""
    results, errors = [], []
    barrier = threading.Barrier(8)
    numbering = ModelRepository._next_version

    def slow_numbering(self, model):  # widens the window between numbering and creating a version
        number = numbering(self, model)
        time.sleep(0.05)
        return number

    monkeypatch.setattr(ModelRepository, "_next_version", slow_numbering)

    def start():
        barrier.wait(timeout=10)
        try:
            results.append(ModelRepository(tmp_path / "repo", replica="r1").register(spec(dirs["B"])).version)
        except Exception as exc:  # the test is about this not happening
            errors.append(exc)

    ModelRepository(tmp_path / "repo", replica="r1").register(spec(dirs["A"]))
    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == ["2"] * 8
    assert ModelRepository(tmp_path / "repo").versions("topics") == ["1", "2"]
