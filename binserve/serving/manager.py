"""The models one worker serves: loading them off the request path, hot reload, a scheduler for each.

design: `start()` registers the configured models in the model repository, then one background
thread (the watcher) loads and warms the repository's current version of each, so Gunicorn's
heartbeat keeps beating and /readyz says 503 until all are warm, and goes on polling the
repository. Each model sits in a `ModelSlot` that its scheduler (the request batcher, or the
continuous batcher of a generative model; `scheduling.contract.Scheduler`) calls: the slot reads
its served version (adapter and signature, one frozen value) once per batch, so swapping it between
batches means no batch mixes versions, and every batch is tagged with the version that ran it. A
version's batching settings reach the scheduler as one `BatchSettings` (`Scheduler.configure`).
When a model's CURRENT names another version the watcher loads it beside the old one, warms it,
checks it (finite outputs with the old version's keys and shapes), swaps it in and lets the old
one go. A load or switch that fails is
retried with exponential backoff (1 s doubling to 60 s), and at once when CURRENT changes, so a
worker recovers when the repository is fixed; /readyz says why a model is not loaded meanwhile.
`update()` (POST /update_model) holds the repository's lock for the model while it imports,
checks and moves CURRENT, then waits until every live worker reports the new version - or answers
409 at once when a later update superseded it.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

import torch

from binserve.capabilities.config import served_models
from binserve.config import ServerConfig
from binserve.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientStorage,
    ModelLoadFailed,
    ModelNotFound,
    NotReady,
)
from binserve.observability import metrics
from binserve.process.runtime import in_fresh_thread
from binserve.serving.loader import VersionLoader
from binserve.serving.repository import ModelRepository
from binserve.serving.served import LoadedModel, ModelSlot
from models.registry import configured_specs

log = logging.getLogger("binserve.models")


_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 60.0


class ModelManager:
    """Loads the configured models, follows the repository, and hands out the model a request names."""

    def __init__(self, config: ServerConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        specs = configured_specs(served_models(config.models, config.config), config.served_model_path)
        #: the models the configuration names; model control may unload them or load others
        self.configured = [s.name for s in specs]
        #: the models this worker should serve now (configured, plus loaded, minus unloaded)
        self.names = list(self.configured)
        self.default_name = config.default_model or self.names[0]
        if self.default_name not in self.names:
            raise ValueError(f"default_model {self.default_name!r} is not among the models {self.names}")
        self.pid = os.getpid()
        self.repo = ModelRepository(
            config.repository_root,
            replica=config.replica_id or None,
            report_root=config.report_dir or None,
            poll_s=config.repository_poll_ms / 1000.0,
        )
        self.worker_id = self.repo.worker_id(self.pid)
        self.poll_s = config.repository_poll_ms / 1000.0
        self.loader = VersionLoader(config, device, self.repo)
        self._models: dict[str, LoadedModel] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._poll_lock = threading.Lock()  # one pass over the repository at a time (watcher, model control)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._errors: dict[str, str] = {}  # model -> why it is not loaded, or why its last switch failed
        self._loading: dict[str, tuple[str, float]] = {}  # model -> (version, monotonic start) while loading
        self._retry: dict[str, tuple[str | None, float, float]] = {}  # model -> (CURRENT then, when, backoff)
        self.draining = False  # set on SIGTERM: /readyz says 503 while accepted requests finish
        #: configured models not registered yet: their directory is missing, or the repository is
        #: read-only and the writer has not registered them; retried every poll, and not served
        #: meanwhile (serving the old CURRENT would ignore the configuration)
        self._unregistered = {spec.name: spec for spec in specs}
        self._register_configured()

    def _register_configured(self) -> None:
        for name, spec in list(self._unregistered.items()):
            try:
                registration = self.repo.register(spec)
            except (OSError, ValueError) as exc:  # a missing directory; a read-only repository; a bad manifest
                reason = f"the configuration names {spec.adapter}:{spec.path}, which cannot be registered: {exc}"
                if self._errors.get(name) != reason:
                    log.error("model %s: %s; retrying", name, reason)
                self._errors[name] = reason
                continue
            del self._unregistered[name]
            self._errors.pop(name, None)
            log.info("%s", registration.message(self.repo.current(name)))

    @property
    def ready(self) -> bool:
        """True once every configured model is loaded and warm."""
        return self._ready.is_set()

    def workers_ready(self) -> bool:
        """Whether every worker of this server (this replica) serves every model: the repository's
        reports, fresh, from as many of this replica's workers as Gunicorn runs. One worker's own
        readiness is not the server's: the others may still be loading, and would answer 503."""
        expected = int(os.environ.get("BINSERVE_WORKER_COUNT", "1"))
        prefix = self.repo.replica + ":"
        for name in self.names:
            try:
                workers = self.repo.workers(name)
            except OSError:
                return False
            if sum(1 for w in workers if w.startswith(prefix)) < expected:
                return False
        return True

    def not_ready_reasons(self) -> dict[str, str]:
        """Why each model that is not loaded is not (empty while loading for the first time)."""
        return {name: self._errors[name] for name in self.names if name not in self._models and name in self._errors}

    def loading(self) -> dict[str, dict]:
        """The models not served yet that are not failing: the one loading now (its version and the
        seconds so far) and those after it (models load one at a time)."""
        now, out = time.monotonic(), {}
        for name in self.names:
            if name in self._models or name in self._errors:
                continue
            version, started = self._loading.get(name, (None, None))
            out[name] = {"state": "waiting"} if started is None else {
                "state": "loading", "version": version, "seconds": round(now - started, 1)}  # fmt: skip
        return out

    def start(self, background: bool = True) -> ModelManager:
        """Load and warm all models (on the watcher thread unless `background` is False), then watch."""
        if not background:
            in_fresh_thread(self._poll)
        threading.Thread(target=self._watch, name="binserve-repository-watch", daemon=True).start()
        # Reports are refreshed by a thread of their own: a load can take seconds (engines are
        # exported, gated and timed), and a worker busy loading is alive, not gone.
        threading.Thread(target=self._heartbeat, name="binserve-report", daemon=True).start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.poll_s):
            for name in list(self._models):
                self._report(name)

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until ready (or the timeout); returns readiness."""
        return self._ready.wait(timeout_s)

    def _lock(self, name: str) -> threading.Lock:
        return self._locks.setdefault(name, threading.Lock())  # atomic: one lock per name

    def _add(self, name: str, version: str) -> None:
        """Load `version` of a model this worker does not serve yet, and give it a scheduler."""
        self._loading[name] = (version, time.monotonic())
        try:
            served = self.loader.load(name, version)
        finally:
            self._loading.pop(name, None)
        adapter, slot = served.adapter, ModelSlot(served)
        scheduler = self.loader.scheduler(adapter, slot, self.loader.batch_settings(name, version, adapter))
        self._models[name] = LoadedModel(name, slot, scheduler)
        self.repo.report(name, self.pid, version)
        metrics.set_model_info(name, version, str(self.device), adapter.describe()["dtype"])
        log.info("model %s version %s (%s) is warm on %s", name, version, adapter.adapter_name, self.device)

    # --- following the repository ----------------------------------------------------------------
    def _watch(self) -> None:
        self.refresh()
        while not self._stop.wait(self.poll_s):
            self.refresh()

    def refresh(self) -> None:
        """Follow the repository now rather than at the next poll (model control calls this)."""
        with self._poll_lock:
            in_fresh_thread(self._poll)  # its torch work leaves no OpenMP team on this thread

    def _wanted(self) -> list[str]:
        """What to serve: configured models not unloaded, and repository models loaded by model control."""
        try:
            listed = self.repo.models()
            state = {name: self.repo.serving(name) for name in {*listed, *self.configured}}
        except OSError:
            return self.names  # the repository is unreadable for a moment: keep serving what we serve
        configured = [n for n in self.configured if state.get(n) is not False]
        return configured + [n for n in listed if n not in self.configured and state.get(n) is True]

    def _poll(self) -> None:
        """One pass: serve what model control says, and load or switch every model whose CURRENT
        differs from what this worker serves."""
        self._register_configured()
        self.names = self._wanted()
        for name in [n for n in self._models if n not in self.names]:
            self.drop(name)
        for name in self.names:
            if name in self._unregistered:
                continue  # /readyz says why
            loaded = self._models.get(name)
            try:
                version = self.repo.current(name)
            except (KeyError, OSError, ValueError) as exc:
                self._failed(name, None, f"{type(exc).__name__}: {exc}")
                continue
            if loaded is None or version != loaded.adapter.version:
                self._try(name, version)
        if all(name in self._models for name in self.names):
            self._ready.set()
        metrics.set_ready(self._ready.is_set() and not self.draining)

    def _try(self, name: str, version: str) -> None:
        seen, when, _ = self._retry.get(name, (None, 0.0, 0.0))
        if seen == version and time.monotonic() < when:
            return  # backing off; a new CURRENT is tried at once
        with self._lock(name):
            loaded = self._models.get(name)
            reason = None
            try:
                # CURRENT again, under the lock: an update may have moved it while we waited for the lock
                version = self.repo.current(name)
                if loaded is not None and version == loaded.adapter.version:
                    return
                if loaded is None:
                    self._add(name, version)
                elif version != loaded.adapter.version:
                    self._swap_in(loaded, version)
            except Exception as exc:
                log.exception("model %s: could not load version %s", name, version)
                reason = f"version {version}: {type(exc).__name__}: {exc}"  # text only: frames hold the model
            if reason is not None:
                if loaded is not None:
                    metrics.RELOADS.labels(name, "failure").inc()
                self._failed(name, version, reason)
                self.loader.release_memory()
            else:
                self._errors.pop(name, None)
                self._retry.pop(name, None)

    def _failed(self, name: str, version: str | None, reason: str) -> None:
        seen, _, backoff = self._retry.get(name, (None, 0.0, 0.0))
        backoff = min(_RETRY_MAX_S, 2 * backoff) if seen == version and backoff else _RETRY_FIRST_S
        self._retry[name] = (version, time.monotonic() + backoff, backoff)
        self._errors[name] = f"{reason} (retrying in {backoff:.0f}s)"

    def _report(self, name: str) -> None:
        loaded = self._models.get(name)
        if loaded is None:
            return  # dropped (unloaded) meanwhile: its report is gone and must stay gone
        try:
            self.repo.report(name, self.pid, loaded.adapter.version)
        except OSError as exc:
            log.warning("model %s: cannot write this worker's report: %s", name, exc)

    def _swap_in(self, loaded: LoadedModel, version: str) -> None:
        """Load, warm and check `version` of `loaded` beside the serving one, then serve it."""
        served = self.loader.load(loaded.name, version)
        adapter = served.adapter
        if served.signature != loaded.signature:
            raise ValueError(
                f"version {version} gives outputs {served.signature}, the serving version gives {loaded.signature}"
            )
        old = loaded.adapter
        settings = self.loader.batch_settings(loaded.name, version, adapter)
        loaded.slot.current = served  # one assignment: the next batch runs on it
        if adapter.generates:
            # a new generation loop on the new version; the old one finishes its sequences, then stops
            old_scheduler, loaded.scheduler = loaded.scheduler, self.loader.scheduler(adapter, loaded.slot, settings)
            threading.Thread(target=old_scheduler.close, name="binserve-generate-drain", daemon=True).start()
        else:
            loaded.scheduler.configure(settings)  # the new version's batching, from the next batch on
        self.repo.report(loaded.name, self.pid, version)
        metrics.set_model_info(loaded.name, version, str(self.device), adapter.describe()["dtype"], old.version)
        metrics.RELOADS.labels(loaded.name, "success").inc()
        log.info("model %s: now serving version %s (was %s)", loaded.name, version, old.version)
        del old
        self.loader.release_memory()

    # --- POST /update_model ----------------------------------------------------------------------
    def update(
        self, name: str, *, version: str | None, path: str | None, adapter: str | None, timeout_s: float
    ) -> dict:
        """Check a version (or import `path` as one), make it current, and wait for every worker."""
        if name not in self.names:
            raise ModelNotFound(f"model {name!r} is not served here; models: {sorted(self.names)}")
        if path is not None and not self.config.import_root:
            raise Forbidden(
                "path imports are off: start the server with import_root=<directory> to import model "
                "directories from under it, or copy the version into the repository and name it"
            )
        with self._lock(name), self.repo.lock(name):
            expected = set(self.repo.workers(name))  # every worker live now must come to serve it
            loaded = self._models.get(name)
            imported = None
            if path is not None:
                kind = adapter or (loaded.adapter.adapter_name if loaded else self._current_adapter(name))
                try:
                    version = imported = self.repo.import_version(
                        name, path, kind, self.config.import_root, self.config.max_import_bytes
                    )
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the volume, not the request, is at fault
                        raise InsufficientStorage(
                            f"could not import {path!r} as a version of {name!r}: the model repository's volume "
                            f"is full ({os.strerror(exc.errno)}); nothing was kept and the serving version is "
                            "unchanged"
                        ) from None
                    raise BadRequest(f"could not import {path!r} as a version of {name!r}: {exc}") from None
                except ValueError as exc:
                    raise BadRequest(f"could not import {path!r} as a version of {name!r}: {exc}") from None
            try:
                self.repo.spec(name, version)  # exists and is readable, before anything is loaded
            except KeyError as exc:
                raise ModelNotFound(str(exc.args[0])) from None
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            serving = loaded.adapter.version if loaded else None
            if version != serving:
                reason = None
                try:
                    if loaded is not None:
                        self._swap_in(loaded, version)
                    else:
                        self._add(name, version)
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"  # text only: the traceback's frames hold the model
                if reason is not None:
                    metrics.RELOADS.labels(name, "failure").inc()
                    if imported is not None:
                        self.repo.remove_version(name, imported)  # a refused import leaves nothing behind
                    self.loader.release_memory()
                    keeps = f"version {serving} keeps serving" if serving else "nothing was serving it"
                    raise ModelLoadFailed(f"version {version} of {name!r} was refused and {keeps}: {reason}")
            self._errors.pop(name, None)
            self._retry.pop(name, None)
            self.repo.set_current(name, version)
        return self._await_convergence(name, version, timeout_s, expected)

    def _current_adapter(self, name: str) -> str:
        try:
            return self.repo.spec(name, self.repo.current(name)).adapter
        except (KeyError, ValueError, OSError):
            raise BadRequest(f"model {name!r} serves no version to take the adapter from; name the 'adapter'") from None

    def _await_convergence(self, name: str, version: str, timeout_s: float, expected: set[str]) -> dict:
        def check():
            current = self.repo.current(name)
            if current != version:
                raise Conflict(
                    f"version {version} of {name!r} was superseded by version {current}, made current by a later "
                    "update, before every worker served it"
                )
            return self.repo.serving_everywhere(name, version, expected)  # this worker reports too

        converged, workers = self.repo.await_workers(check, timeout_s)
        return {"model": name, "version": version, "converged": converged, "workers": workers}

    # --- lookups ---------------------------------------------------------------------------------
    def get(self, name: str | None) -> LoadedModel:
        """The loaded model `name` (None: the default one)."""
        name = name or self.default_name
        loaded = self._models.get(name)
        if loaded is not None:
            return loaded
        if name not in self.names:
            if name in self.configured or self._in_repository(name):
                raise ModelNotFound(
                    f"model {name!r} is unloaded; an admin can load it (POST /v2/repository/models/{name}/load)"
                )
            raise ModelNotFound(f"model {name!r} is not served here; models: {sorted(self.names)}")
        if name in self._errors:
            raise NotReady(f"model {name!r} is not loaded (GET /readyz says why); retrying", retry_after_s=5.0)
        raise NotReady(f"model {name!r} is still loading", retry_after_s=1.0)

    def served(self) -> list[LoadedModel]:
        """The models this worker serves now."""
        return list(self._models.values())

    def describe(self) -> list[dict]:
        """GET /models: each loaded model's description, batching settings and per-worker versions."""
        out = []
        for loaded in list(self._models.values()):
            info = loaded.adapter.describe()
            info["default"] = loaded.name == self.default_name
            info["worker"] = self.worker_id
            info["worker_pid"] = self.pid
            info["repository_version"] = self.repo.current(loaded.name)
            info["workers"] = self.repo.workers(loaded.name)
            info["last_error"] = self._errors.get(loaded.name)
            scheduler = loaded.scheduler
            info["batching"] = {**scheduler.settings.as_dict(), "queued_samples": scheduler.queued_samples}
            info["stats"] = scheduler.stats()
            out.append(info)
        return out

    def _in_repository(self, name: str) -> bool:
        try:
            return (self.repo.model_dir(name) / "CURRENT").exists()
        except (OSError, ValueError):
            return False

    def drop(self, name: str) -> None:
        """Stop serving a model here: new requests get 404 at once, queued ones finish first."""
        with self._lock(name):
            loaded = self._models.pop(name, None)
            if loaded is None:
                return
            loaded.scheduler.close()  # drains: every request it accepted is answered
            self.repo.forget(name, self.pid)
            self._errors.pop(name, None)
            self._retry.pop(name, None)
            adapter = loaded.adapter
            metrics.clear_model_info(name, adapter.version, str(self.device), adapter.describe()["dtype"])
            log.info("model %s: unloaded (was serving version %s)", name, loaded.adapter.version)
            del loaded
        self.loader.release_memory()

    def start_draining(self) -> None:
        """The worker is shutting down: report not-ready so load balancers stop sending requests."""
        self.draining = True
        metrics.set_ready(False)

    def close(self) -> None:
        """Stop watching, finish queued work and stop every scheduler."""
        self._stop.set()
        for loaded in list(self._models.values()):
            loaded.scheduler.close()
            self.repo.forget(loaded.name, self.pid)
