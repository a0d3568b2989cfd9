"""Server configuration: one frozen dataclass; defaults, then `BINSERVE_*` env vars, then CLI flags.

design: every field is both an environment variable (`BINSERVE_<FIELD>`) and a flag (`--field-name`),
generated from the dataclass so the three can never drift apart (TEI's `#[clap(long, env)]`).
Units are in the names. `python server.py --port 9000` passes its settings on to the Gunicorn
workers through the same env vars, so a worker reads exactly the config the command line gave.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, fields

ENV_PREFIX = "BINSERVE_"
#: the server's version (V2 server metadata, the image tag)
VERSION = "0.3.0"
#: what `runtime` and `precision` may name (models/engines.py explains them)
RUNTIMES = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class ServerConfig:
    """Everything a binserve process needs to know; see README.md's configuration table."""

    #: models to serve: comma-separated `name=adapter:path` (empty: all-MiniLM-L6-v2 as "minilm")
    models: str = ""
    #: the model `/infer` (without a name) uses; empty: the first of `models`
    default_model: str = ""
    #: directory of model versions that all workers (and replicas sharing it) follow; see README
    model_repository: str = "model_repository"
    #: how often each worker checks the repository for a new current version
    repository_poll_ms: float = 500.0
    #: how long /update_model waits for every worker to serve the new version
    reload_timeout_s: float = 120.0
    host: str = "127.0.0.1"
    port: int = 8000
    #: Gunicorn worker processes; 0: two where the process may use two cores or more, else one (the
    #: workers share the cores between their running batches: a lone request still gets them all)
    workers: int = 0
    #: request threads per Gunicorn worker (gthread): how many requests one process can batch
    threads: int = 64
    #: "auto" (cuda when available), "cpu", "cuda" or "cuda:N"
    device: str = "auto"
    #: intra-op threads of a batch (torch and ONNX Runtime); 0: the usable cores, shared between the
    #: batches that run at the same moment (coreshare.py)
    torch_threads: int = 0
    max_batch_size: int = 32
    #: padded tokens (rows x longest row) per batch, for token inputs; small enough that long
    #: rows make small batches of similar length (raise it on a GPU, which wants big batches)
    max_batch_tokens: int = 4096
    #: extra wait for a fuller batch once a request is queued; 0 adds no latency at low load
    max_wait_ms: float = 0.0
    #: samples waiting in one model's queue before new requests get 429
    max_queue_samples: int = 2048
    #: default deadline of a request (X-Request-Timeout-Ms overrides it per request)
    request_timeout_s: float = 30.0
    #: on SIGTERM, how long a worker may finish accepted requests before it is killed; keep it
    #: below Kubernetes' terminationGracePeriodSeconds minus the preStop delay
    graceful_timeout_s: float = 30.0
    max_body_bytes: int = 64 * 1024 * 1024
    #: JSON bodies (curl, browsers) are parsed whole before anything can be counted: a smaller limit
    max_json_bytes: int = 4 * 1024 * 1024
    #: what decoding one body may produce at most (each reference to a repeated value counted);
    #: below this cap the budget is 4x the body + 16 MiB
    max_decoded_bytes: int = 256 * 1024 * 1024
    #: characters per text before tokenizing; 0: 100 x the model's maximum tokens
    max_text_chars: int = 0
    #: texts (and token rows) longer than the model's maximum are cut to it (TEI's auto-truncate);
    #: false: such requests get 413
    truncate: bool = True
    #: a client that stalls this long while sending its request is cut (408); see README
    client_timeout_s: float = 5.0
    #: restart a worker after this many requests (with 10% jitter), a last line of defence
    #: against memory growth; 0: never. Each restart reloads the models in that worker.
    max_requests: int = 0
    #: bearer token for /infer; empty: no authentication
    auth_token: str = ""
    #: bearer token for /update_model; empty: the endpoint is disabled (403)
    admin_token: str = ""
    #: comma-separated package prefixes whose nn.Module classes torch_module versions may name
    trusted_modules: str = "models"
    #: directory that /update_model may import model directories from; empty: path imports are off
    import_root: str = ""
    #: largest model directory /update_model imports (bytes, all files)
    max_import_bytes: int = 16 * 1024 * 1024 * 1024
    #: this replica's name in the repository's worker reports; empty: the host name (the pod's name)
    replica_id: str = ""
    #: where workers report the version they serve (shared by replicas); empty: inside the model
    #: repository. Set it when replicas mount the repository read-only
    report_dir: str = ""
    #: a second port for /update_model and /metrics (kept off the inference Service); 0: the main port
    admin_port: int = 0
    #: "auto", "torch" or "onnx": which runtimes a model may run on (auto: the fastest that passes the
    #: accuracy gate, per batch size); a version's settings override it
    runtime: str = "auto"
    #: "auto", "fp32", "bf16", "fp16" or "int8" (auto: those the hardware computes natively)
    precision: str = "auto"
    #: the accuracy gate for embeddings: smallest cosine to fp32 an engine may give
    min_cosine: float = 0.999
    #: where ONNX exports and engine timings are cached; empty: `<version>/.cache` in the repository
    #: (keys cover the files, tools and machine, so one directory can serve every model and version)
    cache_dir: str = ""
    log_level: str = "info"

    @property
    def trusted_module_prefixes(self) -> tuple[str, ...]:
        """`trusted_modules` as a tuple of package prefixes."""
        return tuple(p.strip() for p in self.trusted_modules.split(",") if p.strip())

    def __post_init__(self) -> None:
        positive = ("port", "threads", "max_batch_size", "max_batch_tokens", "max_queue_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.port > 65535 or not 0 <= self.admin_port <= 65535 or self.admin_port == self.port:
            raise ValueError(
                f"port and admin_port must be distinct ports (admin_port 0: none), got {self.port}, {self.admin_port}"
            )
        for prefix in self.trusted_module_prefixes:
            if not all(part.isidentifier() for part in prefix.split(".")):
                raise ValueError(f"trusted_modules must be dotted package names, got {prefix!r}")
        if self.max_import_bytes < 1:
            raise ValueError("max_import_bytes must be at least 1")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: automatic), got {self.workers}")
        if self.torch_threads < 0 or self.max_wait_ms < 0 or self.max_text_chars < 0 or self.max_requests < 0:
            raise ValueError("torch_threads, max_wait_ms, max_text_chars and max_requests must be >= 0")
        for name in ("max_body_bytes", "max_json_bytes", "max_decoded_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.client_timeout_s <= 0:
            raise ValueError(f"client_timeout_s must be > 0, got {self.client_timeout_s}")
        if self.graceful_timeout_s <= 0:
            raise ValueError(f"graceful_timeout_s must be > 0, got {self.graceful_timeout_s}")
        if self.repository_poll_ms <= 0 or self.reload_timeout_s <= 0:
            raise ValueError("repository_poll_ms and reload_timeout_s must be > 0")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.runtime not in RUNTIMES or self.precision not in PRECISIONS:
            raise ValueError(f"runtime must be one of {RUNTIMES} and precision one of {PRECISIONS}")
        if not 0 < self.min_cosine <= 1:
            raise ValueError(f"min_cosine must be in (0, 1], got {self.min_cosine}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @classmethod
    def from_env(cls, environ: dict | None = None, **overrides) -> ServerConfig:
        """Defaults, overridden by `BINSERVE_*` variables, overridden by keyword arguments."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, environ: dict | None = None) -> ServerConfig:
        """Defaults → env → command-line flags (`--max-batch-size 64`, ...)."""
        parser = argparse.ArgumentParser(prog="server.py", description="Start the binserve server under Gunicorn.")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, dest=f.name, default=None, help=f"(env {ENV_PREFIX}{f.name.upper()})")
        args = parser.parse_args(argv)
        overrides = {k: _parse(_field(cls, k), v) for k, v in vars(args).items() if v is not None}
        return cls.from_env(environ, **overrides)

    def to_env(self) -> dict[str, str]:
        """This config as `BINSERVE_*` variables (what `server.py` hands to the Gunicorn workers)."""
        return {ENV_PREFIX + k.upper(): str(v) for k, v in dataclasses.asdict(self).items()}


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in fields(cls) if f.name == name)


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse(f: dataclasses.Field, raw: str):
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if kind is bool:
        if raw.strip().lower() not in _BOOLS:
            raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be true or false, got {raw!r}")
        return _BOOLS[raw.strip().lower()]
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be of type {kind.__name__}, got {raw!r}") from None
