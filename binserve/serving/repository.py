"""The model repository: the directory every worker (and every replica sharing it) takes versions from.

design: `<root>/<model>/<version>/binserve.json` describes a version (adapter name, settings, and
the model directory: the version directory itself, or a `path` it points to); `<root>/<model>/CURRENT`
names the version to serve, and `<root>/<model>/CONFIGURED` the version a server's configuration
named when it last started (`register`: a restart serves what the configuration says, and leaves a
hot reload standing when the configuration did not change). Writers replace CURRENT atomically
(write a temporary file, rename), so a reader sees the old name or the new one, never half, and
hold `<root>/<model>/.lock` (flock) while they register, import, check and move CURRENT, so
concurrent updates from any worker or replica take turns. Workers poll CURRENT and report the
version they serve in `<root>/<model>/.workers/<replica>_<pid>.json`, touched on every poll, which
is how /update_model knows when every live worker has converged; the replica name (the host name:
the pod's name in Kubernetes) keeps replicas that number their processes alike apart. The
directory is the source of truth: no worker needs to receive the update call to follow it, and a
worker that starts later loads whatever CURRENT says.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from binserve.serving.imports import MAX_IMPORT_FILES, Budget, copy_confined, under_root
from models.registry import ADAPTERS, ModelSpec, check_settings

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: one part of a Hugging Face hub id used as a model name (`wandb/WeaveFluencyScorerV1`: the encoder
#: server's names): as the hub allows, no `--` or `..` inside, no `-` or `.` at either end
_HUB_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")


def _hub_parts(name: str, sep: str) -> tuple[str, str] | None:
    parts = name.split(sep)
    if len(parts) != 2 or any(not _HUB_PART.match(p) or "--" in p or ".." in p for p in parts):
        return None
    return parts[0], parts[1]


def valid_model_name(name: str) -> bool:
    """A model name: 1-64 letters, digits, '.', '_' or '-' (not first), or a hub id `org/name`."""
    return bool(_NAME.match(name) or _hub_parts(name, "/"))


def _dirname(name: str) -> str:
    """The repository directory of model `name`: the name, or `_<org>--<name>` for a hub id (a plain
    name never starts with `_`, and a hub id holds no `--`, so no two names share a directory)."""
    if _NAME.match(name):
        return name
    hub = _hub_parts(name, "/")
    if hub is None:
        raise ValueError(f"model name {name!r} must be letters, digits, '.', '_' or '-', or a hub id 'org/name'")
    return f"_{hub[0]}--{hub[1]}"


def _name_of(dirname: str) -> str | None:
    if _NAME.match(dirname):
        return dirname
    hub = _hub_parts(dirname[1:], "--") if dirname.startswith("_") else None
    return f"{hub[0]}/{hub[1]}" if hub else None


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Registration:
    """What `register` did with a configured model: `action` is "registered" (a new version),
    "switched" (an existing version made current again) or "kept" (CURRENT left as it was)."""

    model: str
    version: str
    action: str
    path: str
    previous: str | None  # CURRENT before
    previous_path: str | None

    def message(self, current: str | None = None) -> str:
        """The log line, e.g. `model topics: configuration names /m/B; registered as version 2 (was 1: /m/A)`."""
        was = f" (was {self.previous}: {self.previous_path})" if self.previous and self.previous != self.version else ""
        head = f"model {self.model}: configuration names {self.path}"
        if self.action == "registered":
            return f"{head}; registered as version {self.version}{was}"
        if self.action == "switched":
            return f"{head}, version {self.version}; made it current{was}"
        if current and current != self.version:
            return f"{head}, version {self.version}; version {current}, made current since, stays current"
        return f"{head}, version {self.version}; it is current"


#: a worker whose reports are older than this many polls (plus a second of slack) is gone
LIVE_POLLS = 3


class ModelRepository:
    """Versions of each model on disk, which one is current, and which worker serves which."""

    def __init__(
        self,
        root: str | Path,
        replica: str | None = None,
        report_root: str | Path | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        #: where worker reports go: the repository itself, or a writable directory beside a read-only one
        self.report_root = Path(report_root).resolve() if report_root else self.root
        replica = replica or socket.gethostname() or "local"
        if not _NAME.match(replica):
            raise ValueError(f"replica id {replica!r} must be letters, digits, '.', '_' or '-'")
        #: this replica's name in worker reports (the pod's name in Kubernetes)
        self.replica = replica
        #: how often workers poll the repository (and refresh their reports)
        self.poll_s = poll_s
        #: reports older than this are of workers that are gone
        self.live_age_s = LIVE_POLLS * poll_s + 1

    def model_dir(self, model: str) -> Path:
        return self.root / _dirname(model)

    def register(self, spec: ModelSpec) -> Registration:
        """Follow the configuration: the version whose directory and adapter the configuration names
        is the configured version, and CURRENT moves to it when the configuration changed.

        - A directory no version has: registered as the next version, and made current.
        - The directory of the version configured last time: CURRENT stays (a hot reload since stands).
        - The directory of another version (the configuration went back to it): made current.
        A configured directory that does not exist is refused (FileNotFoundError naming it) before
        anything is written, so a typo in one server's flags cannot point every replica sharing the
        repository at nothing. Writes happen only when something changes, under the model's lock,
        so read-only replicas and workers that start together register alike.
        """
        name = spec.name
        path = str(Path(spec.path).resolve())
        manifest = {"adapter": spec.adapter, "path": path, **({"settings": spec.settings} if spec.settings else {})}
        found = self._version_of(name, spec.adapter, path)
        if found is None and not Path(path).is_dir():
            raise FileNotFoundError(f"the configured directory {path} does not exist (or is not a directory)")
        before, configured = self._current_or_none(name), self._configured(name)
        unchanged = configured in (found, None) and before is not None and self._manifest(name, found) == manifest
        if found is not None and unchanged:
            if configured is None:  # a repository from before CONFIGURED was kept: remember, if we may write
                with contextlib.suppress(OSError):
                    _atomic_write(self.model_dir(name) / "CONFIGURED", found + "\n")
            return Registration(name, found, "kept", path, before, self._path_of(name, before))
        self.model_dir(name).mkdir(parents=True, exist_ok=True)
        with self.lock(name):  # another worker or replica may be registering it at this moment
            return self._register_locked(spec, manifest, path)

    def preview(self, spec: ModelSpec) -> str:
        """What `register` will do with a configured model, read only (the start-up banner says it)."""
        path = str(Path(spec.path).resolve())
        if not Path(path).is_dir() and self._version_of(spec.name, spec.adapter, path) is None:
            return f"{spec.name}: {spec.adapter} {path} - MISSING: no such directory"
        found = self._version_of(spec.name, spec.adapter, path)
        before, configured = self._current_or_none(spec.name), self._configured(spec.name)
        if found is None:
            return f"{spec.name}: {spec.adapter} {path} - a new version, {self._next_version(spec.name)}"
        if before is not None and configured in (found, None):
            kept = f"version {before} (made current since)" if before != found else f"version {found}"
            return f"{spec.name}: {spec.adapter} {path} - {kept}"
        return f"{spec.name}: {spec.adapter} {path} - version {found}, made current again (was {before})"

    def _register_locked(self, spec: ModelSpec, manifest: dict, path: str) -> Registration:
        name, mdir = spec.name, self.model_dir(spec.name)
        before, configured = self._current_or_none(name), self._configured(name)
        found = self._version_of(name, spec.adapter, path)
        if found is None:
            found, action = self._next_version(name), "registered"
            (mdir / found).mkdir()
        elif before is not None and configured in (found, None):
            action = "kept"
        else:
            action = "switched"
        if self._manifest(name, found) != manifest:  # new, or settings given with --models that changed
            _atomic_write(mdir / found / "binserve.json", json.dumps(manifest, indent=2) + "\n")
        if action != "kept":
            _atomic_write(mdir / "CURRENT", found + "\n")
        if configured != found:
            _atomic_write(mdir / "CONFIGURED", found + "\n")
        return Registration(name, found, action, path, before, self._path_of(name, before))

    def _manifest(self, model: str, version: str | None) -> dict | None:
        if version is None:
            return None
        try:
            return json.loads((self.model_dir(model) / version / "binserve.json").read_text())
        except (OSError, ValueError):
            return None

    def _path_of(self, model: str, version: str | None) -> str | None:
        """The resolved directory a version's files are in (its `path`, or the version directory)."""
        manifest = self._manifest(model, version)
        if manifest is None:
            return None
        vdir = self.model_dir(model) / version
        return str((vdir / manifest["path"]).resolve() if manifest.get("path") else vdir.resolve())

    def _version_of(self, model: str, adapter: str, path: str) -> str | None:
        """The newest version of `model` served by `adapter` from directory `path`, if any."""
        matches = [
            v
            for v in self.versions(model)
            if (self._manifest(model, v) or {}).get("adapter") == adapter and self._path_of(model, v) == path
        ]
        return matches[-1] if matches else None

    def _configured(self, model: str) -> str | None:
        """The version the configuration named when a server last registered this model."""
        try:
            return (self.model_dir(model) / "CONFIGURED").read_text().strip() or None
        except OSError:
            return None

    def _current_or_none(self, model: str) -> str | None:
        try:
            return self.current(model)
        except (KeyError, OSError):
            return None

    def _next_version(self, model: str) -> str:
        return str(max((int(v) for v in self.versions(model) if v.isdigit()), default=0) + 1)

    def versions(self, model: str) -> list[str]:
        """Versions on disk, oldest first by number where they are numbers."""
        mdir = self.model_dir(model)
        names = (
            [p.name for p in mdir.iterdir() if p.is_dir() and (p / "binserve.json").exists()] if mdir.is_dir() else []
        )
        return sorted(names, key=lambda v: (0, int(v), v) if v.isdigit() else (1, 0, v))

    def models(self) -> list[str]:
        """Every model in the repository (a directory with a CURRENT version), sorted."""
        names = (_name_of(p.parent.name) for p in self.root.glob("*/CURRENT"))
        return sorted(n for n in names if n is not None)

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
            version = self._next_version(model)
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
        return self.report_root / _dirname(model) / ".workers"

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

    def workers(self, model: str, max_age_s: float | None = None) -> dict[str, str]:
        """Versions served by the workers ("replica:pid") that reported within `max_age_s` (default:
        the live workers, `live_age_s`).

        Stale reports are ignored; this replica's own are removed once long stale (its dead
        workers), another replica's never - it may only be slow, and it cleans up after itself.
        """
        max_age_s = self.live_age_s if max_age_s is None else max_age_s
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

    def serving_everywhere(self, model: str, version: str, expected: set[str]) -> tuple[bool, dict[str, str]]:
        """Whether every live worker serves `version` and none of `expected` (the workers live when
        the change began) is only late with its report: (done, the live workers' versions).

        A worker busy loading the new version on a starved CPU can miss its report's refresh for a
        few seconds; without `expected` it would drop out of the live set and the others alone
        would look converged (seen behind a load balancer: 2 of 3 replicas). One whose report is
        ten times past the live age is gone (killed, scaled down) and is not waited for."""
        live = self.workers(model)
        recent = self.workers(model, max_age_s=10 * self.live_age_s)
        late = [w for w in expected if w not in live and w in recent]
        return bool(live) and not late and all(v == version for v in live.values()), live

    def await_workers(self, check: Callable[[], tuple[bool, object]], timeout_s: float) -> tuple[bool, object]:
        """Ask `check() -> (done, result)` about the workers' reports (refreshed every poll) until it is
        done or `timeout_s` passed; (done, the last result). How a reload, a load and an unload wait
        for every worker and replica to agree."""
        deadline = time.monotonic() + timeout_s
        while True:
            done, result = check()
            if done or time.monotonic() >= deadline:
                return done, result
            time.sleep(self.poll_s / 2)  # polling files other processes write, not waiting for readiness

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
