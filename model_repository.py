"""The model repository: the directory every worker (and every replica sharing it) takes versions from.

design: `<root>/<model>/<version>/manifest.json` describes a version (adapter name, and the model
directory: the version directory itself, or a `path` it points to); `<root>/<model>/CURRENT` names
the version to serve. Writers replace CURRENT atomically (write a temporary file, rename), so a
reader sees the old name or the new one, never half. Workers poll CURRENT and report the version
they serve in `<root>/<model>/.workers/<pid>.json`, touched on every poll, which is how
/update_model knows when every live worker has converged. The directory is the source of truth:
no worker needs to receive the update call to follow it, and a worker that starts later loads
whatever CURRENT says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from models.registry import ADAPTERS, ModelSpec

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class ModelRepository:
    """Versions of each model on disk, which one is current, and which worker serves which."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def model_dir(self, model: str) -> Path:
        if not _NAME.match(model):
            raise ValueError(f"model name {model!r} must be letters, digits, '.', '_' or '-'")
        return self.root / model

    def register(self, spec: ModelSpec) -> None:
        """Make `spec` version 1 of its model if the model is not in the repository yet."""
        mdir = self.model_dir(spec.name)
        if (mdir / "CURRENT").exists():
            return
        vdir = mdir / spec.version
        vdir.mkdir(parents=True, exist_ok=True)
        manifest = {"adapter": spec.adapter, "path": str(Path(spec.path).resolve())}
        _atomic_write(vdir / "binserve.json", json.dumps(manifest, indent=2) + "\n")
        _atomic_write(mdir / "CURRENT", spec.version + "\n")

    def versions(self, model: str) -> list[str]:
        """Versions on disk, oldest first by number where they are numbers."""
        mdir = self.model_dir(model)
        names = (
            [p.name for p in mdir.iterdir() if p.is_dir() and (p / "binserve.json").exists()] if mdir.is_dir() else []
        )
        return sorted(names, key=lambda v: (0, int(v), v) if v.isdigit() else (1, 0, v))

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
        path = Path(manifest.get("path", vdir))
        return ModelSpec(model, adapter, str(path if path.is_absolute() else vdir / path), version)

    def set_current(self, model: str, version: str) -> None:
        """Point every worker at `version` (which must exist)."""
        self.spec(model, version)
        _atomic_write(self.model_dir(model) / "CURRENT", version + "\n")

    def import_version(self, model: str, source: str | Path, adapter: str) -> str:
        """Copy a model directory in as the next numbered version; returns the version."""
        src = Path(source)
        if not src.is_dir():
            raise ValueError(f"path {str(source)!r} is not a directory on the server")
        if adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r} (known: {sorted(ADAPTERS)})")
        numbers = [int(v) for v in self.versions(model) if v.isdigit()]
        version = str(max(numbers, default=0) + 1)
        staging = Path(tempfile.mkdtemp(dir=self.model_dir(model), prefix=".import-"))
        shutil.copytree(src, staging, dirs_exist_ok=True)
        _atomic_write(staging / "binserve.json", json.dumps({"adapter": adapter}, indent=2) + "\n")
        os.rename(staging, self.model_dir(model) / version)  # appears whole or not at all
        return version

    # --- which worker serves what --------------------------------------------------------------
    def report(self, model: str, pid: int, version: str) -> None:
        """Record (and keep fresh) that worker `pid` serves `version`."""
        wdir = self.model_dir(model) / ".workers"
        wdir.mkdir(exist_ok=True)
        _atomic_write(wdir / f"{pid}.json", json.dumps({"version": version, "pid": pid}))

    def forget(self, model: str, pid: int) -> None:
        """Remove a worker's report (it is exiting)."""
        try:
            (self.model_dir(model) / ".workers" / f"{pid}.json").unlink()
        except FileNotFoundError:
            pass

    def workers(self, model: str, max_age_s: float) -> dict[int, str]:
        """Versions served by the workers that reported within `max_age_s` (stale reports are removed)."""
        wdir = self.model_dir(model) / ".workers"
        out: dict[int, str] = {}
        now = time.time()  # file mtimes are wall-clock times
        for f in wdir.glob("*.json") if wdir.is_dir() else ():
            try:
                age = now - f.stat().st_mtime
                if age > max_age_s:
                    if age > 10 * max_age_s:
                        f.unlink()
                    continue
                info = json.loads(f.read_text())
                out[int(info["pid"])] = info["version"]
            except (OSError, ValueError, KeyError):
                continue  # replaced or removed while we read it
        return out
