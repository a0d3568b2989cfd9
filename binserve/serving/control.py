"""Model control, as Triton's repository API: list the repository, load a model, unload one.

design: the repository is the one source of truth every worker and replica follows. Loading or
unloading writes the model's SERVING state there (under the model's repository lock); every
worker's watcher then loads the model (or drains its batcher and drops it) on its next poll, and
the call waits until the workers' reports agree, as a reload does. The worker that takes the call
acts at once, so its own answer does not wait a poll. Requests for an unloaded model get 404
naming the way back; queued requests for it are answered before it goes.
"""

from __future__ import annotations

from binserve.errors import ModelNotFound


class ModelControl:
    """Load, unload and list models for a `ModelManager` (the admin routes call it)."""

    def __init__(self, manager) -> None:
        self.manager = manager
        self.repo = manager.repo

    def _live_workers(self) -> set[str]:
        """Workers (replica:pid) that reported for any model lately: the ones that must agree."""
        live = set()
        for name in self.repo.models():
            live |= set(self.repo.workers(name))
        return live

    def index(self) -> list[dict]:
        """Every model in the repository: versions, the current one, and which workers serve what."""
        out = []
        wanted = set(self.manager.names)
        for name in self.repo.models():
            workers = self.repo.workers(name)
            current = self.repo.current(name)
            serving = name in wanted
            ready = serving and bool(workers) and all(v == current for v in workers.values())
            if ready:
                reason = ""
            elif serving:
                reason = "loading or failed (GET /readyz says why)"
            elif self.repo.serving(name) is False:
                reason = "unloaded (model control)"
            else:  # in the repository, never loaded here: not among the configured models
                reason = f"not loaded: not in this server's models (POST /v2/repository/models/{name}/load)"
            out.append(
                {
                    "name": name,
                    "version": current,
                    "state": "READY" if ready else "UNAVAILABLE",
                    "reason": reason,
                    "versions": self.repo.versions(name),
                    "serving": serving,
                    "configured": name in self.manager.configured,
                    "workers": workers,
                }
            )
        return out

    def _set(self, name: str, on: bool) -> None:
        """Write the model's SERVING state, and follow it in this worker at once."""
        if name not in self.repo.models():
            raise ModelNotFound(f"model {name!r} is not in the repository; models: {self.repo.models()}")
        with self.repo.lock(name):
            self.repo.set_serving(name, on)
        self.manager.refresh()  # raises nothing: a failed load goes to /readyz and is retried

    def load(self, name: str, timeout_s: float) -> dict:
        """Serve a model that is in the repository; returns once every live worker serves it.
        Not converged: `error` says why (the load's failure, or the workers that lag)."""
        self._set(name, True)
        version = self.repo.current(name)

        def check():
            workers = self.repo.workers(name)
            lagging = sorted(w for w in self._live_workers() if workers.get(w) != version)
            return not lagging, (workers, lagging)

        converged, (workers, lagging) = self.repo.await_workers(check, timeout_s)
        out = {"model": name, "version": version, "converged": converged, "workers": workers, "lagging": lagging}
        if not converged:
            why = self.manager.not_ready_reasons().get(name) or f"workers {lagging} do not serve it after the timeout"
            out["error"] = f"model {name!r} is not loaded everywhere: {why}"
        return out

    def unload(self, name: str, timeout_s: float) -> dict:
        """Stop serving a model everywhere; returns once no worker reports serving it."""
        self._set(name, False)

        def check():
            workers = self.repo.workers(name)
            return not workers, workers

        converged, workers = self.repo.await_workers(check, timeout_s)
        out = {"model": name, "converged": converged, "workers": workers}
        if not converged:
            out["error"] = f"workers {sorted(workers)} still serve {name!r}"
        return out
