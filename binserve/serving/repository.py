"""The model repository: the directory every worker (and every replica sharing it) takes versions from.

design: `<root>/<model>/<version>/manifest.json` describes a version (adapter name, and the model
directory: the version directory itself, or a `path` it points to); `<root>/<model>/CURRENT` names
the version to serve. Writers replace CURRENT atomically (write a temporary file, rename), so a
reader sees the old name or the new one, never half, and hold `<root>/<model>/.lock` (flock) while
they import, check and move CURRENT, so concurrent updates from any worker or replica take turns.
Workers poll CURRENT and report the version they serve in
`<root>/<model>/.workers/<replica>_<pid>.json`, touched on every poll, which is how /update_model
knows when every live worker has converged; the replica name (the host name: the pod's name in
Kubernetes) keeps replicas that number their processes alike apart. The directory is the source of truth:
no worker needs to receive the update call to follow it, and a worker that starts later loads
whatever CURRENT says.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from binserve.serving.imports import MAX_IMPORT_FILES, Budget, copy_confined, under_root
from models.registry import ADAPTERS, ModelSpec, check_settings

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class ModelRepository:
    """Versions of each model on disk, which one is current, and which worker serves which."""

    def __init__(self, root: str | Path, replica: str | None = None, report_root: str | Path | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        #: where worker reports go: the repository itself, or a writable directory beside a read-only one
        self.report_root = Path(report_root).resolve() if report_root else self.root
        replica = replica or socket.gethostname() or "local"
        if not _NAME.match(replica):
            raise ValueError(f"replica id {replica!r} must be letters, digits, '.', '_' or '-'")
        #: this replica's name in worker reports (the pod's name in Kubernetes)
        self.replica = replica

    def model_dir(self, model: str) -> Path:
        if not _NAME.match(model):
            raise ValueError(f"model name {model!r} must be letters, digits, '.', '_' or '-'")
        return self.root / model

    def register(self, spec: ModelSpec) -> None:
        """Make `spec` version 1 of its model if the model is not in the repository yet."""
        mdir = self.model_dir(spec.name)
        vdir = mdir / spec.version
        manifest = {"adapter": spec.adapter, "path": str(Path(spec.path).resolve())}
        if spec.settings:
            manifest["settings"] = spec.settings
        if (mdir / "CURRENT").exists():
            # The configured version follows its configuration (settings given with --models).
            try:
                if json.loads((vdir / "binserve.json").read_text()).get("path") == manifest["path"]:
                    if json.loads((vdir / "binserve.json").read_text()) != manifest:
                        _atomic_write(vdir / "binserve.json", json.dumps(manifest, indent=2) + "\n")
            except (OSError, ValueError):
                pass
            return
        vdir.mkdir(parents=True, exist_ok=True)
        _atomic_write(vdir / "binserve.json", json.dumps(manifest, indent=2) + "\n")
        _atomic_write(mdir / "CURRENT", spec.version + "\n")

    def versions(self, model: str) -> list[str]:
        """Versions on disk, oldest first by number where they are numbers."""
        mdir = self.model_dir(model)
        names = (
            [p.name for p in mdir.iterdir() if p.is_dir() and (p / "binserve.json").exists()] if mdir.is_dir() else []
        )
        return sorted(names, key=lambda v: (0, int(v), v) if v.isdigit() else (1, 0, v))

    def models(self) -> list[str]:
        """Every model in the repository (a directory with a CURRENT version), sorted."""
        return sorted(p.parent.name for p in self.root.glob("*/CURRENT") if _NAME.match(p.parent.name))

    def serving(self, model: str) -> bool | None:
        """Whether model control says the model is served (True: loaded, False: unloaded), or None
        when it never said (then the server's configuration decides)."""
        try:
            state = (self.model_dir(model) / "SERVING").read_text().strip()
        except FileNotFoundError:
            return None
        return state == "on"

    def set_serving(self, model: str, on: bool) -> None:
        """Load (`on`) or unload a model on every worker and replica that follows this repository."""
        _atomic_write(self.model_dir(model) / "SERVING", "on\n" if on else "off\n")

    def current(self, model: str) -> str:
        """The version every worker should serve."""
        try:
            return (self.model_dir(model) / "CURRENT").read_text().strip()
        except FileNotFoundError:
            raise KeyError(f"model {model!r} is not in the repository {self.root}") from None

    def spec(self, model: str, version: str) -> ModelSpec:
        """The ModelSpec of a version, from its manifest."""
        if not _VERSION.match(version):
            raise ValueError(f"version {version!r} must be letters, digits, '.', '_' or '-'")
        vdir = self.model_dir(model) / version
        try:
            manifest = json.loads((vdir / "binserve.json").read_text())
        except FileNotFoundError:
            raise KeyError(f"model {model!r} has no version {version!r} (versions: {self.versions(model)})") from None
        adapter = manifest.get("adapter")
        if adapter not in ADAPTERS:
            raise ValueError(f"{vdir}/binserve.json: unknown adapter {adapter!r}")
        settings = check_settings(manifest.get("settings", {}), f"{vdir}/binserve.json")
        path = Path(manifest.get("path", vdir))
        path = path if path.is_absolute() else vdir / path
        return ModelSpec(model, adapter, str(path), version, settings=settings, cache_dir=str(vdir / ".cache"))

    def set_current(self, model: str, version: str) -> None:
        """Point every worker at `version` (which must exist)."""
        self.spec(model, version)
        _atomic_write(self.model_dir(model) / "CURRENT", version + "\n")

    def import_version(
        self, model: str, source: str | Path, adapter: str, import_root: str | Path, max_bytes: int
    ) -> str:
        """Copy a model directory from under `import_root` in as the next numbered version; returns it.

        The copy follows no symlink and copies no special file (both refused), stays under
        `max_bytes` and `MAX_IMPORT_FILES`, and is checked and copied in one pass over file
        descriptors opened with O_NOFOLLOW, so the source cannot change between check and copy.
        It is staged in a hidden directory that is removed whatever happens, and renamed into place
        whole.
        """
        src = under_root(source, import_root)
        if adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r} (known: {sorted(ADAPTERS)})")
        staging = Path(tempfile.mkdtemp(dir=self.model_dir(model), prefix=".import-"))
        try:
            copy_confined(src, staging, Budget(max_bytes, MAX_IMPORT_FILES), str(source))
            _atomic_write(staging / "binserve.json", json.dumps({"adapter": adapter}, indent=2) + "\n")
            numbers = [int(v) for v in self.versions(model) if v.isdigit()]
            version = str(max(numbers, default=0) + 1)
            os.rename(staging, self.model_dir(model) / version)  # appears whole or not at all
            return version
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; left over on any failure

    def remove_version(self, model: str, version: str) -> None:
        """Delete a version that was refused (never the current one)."""
        if version == self.current(model):
            raise ValueError(f"version {version} of {model!r} is current; it cannot be removed")
        self.spec(model, version)  # validates the name
        shutil.rmtree(self.model_dir(model) / version, ignore_errors=True)

    def remove_stale_staging(self, model: str, older_than_s: float = 3600.0) -> None:
        """Remove `.import-*` staging directories left by a process that died mid-import."""
        now = time.time()
        for d in self.model_dir(model).glob(".import-*"):
            try:
                if now - d.lstat().st_mtime > older_than_s:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                continue

    # --- which worker serves what --------------------------------------------------------------
    def worker_id(self, pid: int) -> str:
        """This replica's name for worker `pid`: unique across replicas, which all number pids from 1."""
        return f"{self.replica}:{pid}"

    def _reports(self, model: str) -> Path:
        self.model_dir(model)  # validates the name
        return self.report_root / model / ".workers"

    def report(self, model: str, pid: int, version: str) -> None:
        """Record (and keep fresh) that worker `pid` of this replica serves `version`."""
        wdir = self._reports(model)
        wdir.mkdir(parents=True, exist_ok=True)
        info = {"version": version, "replica": self.replica, "pid": pid}
        _atomic_write(wdir / f"{self.replica}_{pid}.json", json.dumps(info))

    def forget(self, model: str, pid: int) -> None:
        """Remove a worker's report (it is exiting)."""
        try:
            (self._reports(model) / f"{self.replica}_{pid}.json").unlink()
        except OSError:
            pass

    def workers(self, model: str, max_age_s: float) -> dict[str, str]:
        """Versions served by the workers ("replica:pid") that reported within `max_age_s`.

        Stale reports are ignored; this replica's own are removed once long stale (its dead
        workers), another replica's never - it may only be slow, and it cleans up after itself.
        """
        wdir = self._reports(model)
        out: dict[str, str] = {}
        now = time.time()  # file mtimes are wall-clock times
        for f in wdir.glob("*.json") if wdir.is_dir() else ():
            try:
                age = now - f.stat().st_mtime
                info = json.loads(f.read_text())
                if age > max_age_s:
                    if age > 10 * max_age_s and info["replica"] == self.replica:
                        f.unlink()
                    continue
                out[f"{info['replica']}:{int(info['pid'])}"] = info["version"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # replaced or removed while we read it
        return out

    @contextlib.contextmanager
    def lock(self, model: str):
        """Hold the repository's lock for `model` (every process and replica sharing the directory)."""
        path = self.model_dir(model) / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock
