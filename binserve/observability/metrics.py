"""Every Prometheus metric binserve exports, defined once, and the /metrics exposition.

design: under Gunicorn each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR, which
gunicorn.conf.py sets (before any worker imports prometheus_client), wipes when the master starts,
and folds into archive files when a worker exits (`archive`); one scrape of any worker then
reads all workers' files, so counters sum over workers and never go backwards when one dies, and
the directory holds the live workers' files plus two archives however often workers restart. Gauges say how
they combine: queue depth and in-flight requests sum over live workers, model info takes the max
(a version's series is 1 while any live worker serves it), device memory sums. Without the
variable (tests, `create_app` in one process) the default registry is exposed as usual.
Names follow Prometheus conventions: `binserve_` prefix, base units, `_total` counters.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from binserve.observability import archive

# Defining a metric below opens its file in PROMETHEUS_MULTIPROC_DIR, which may not exist yet
# (`python server.py` imports this before Gunicorn's config creates it).
archive.ensure_directory()

# Millisecond-scale inference on a GPU up to multi-second queues on a loaded CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
UNKNOWN_MODEL = "_unknown"  # the label for URLs naming no served model (keeps cardinality bounded)
FANOUT_MODEL = "_fanout"  # bytes of requests to several models, and fan-outs naming a model not served

REQUESTS = Counter(
    "binserve_requests_total",
    "Inference requests answered, by model, HTTP status and protocol (native, predict, v2, openai, seed).",
    ["model", "code", "protocol"],
)
REQUEST_DURATION = Histogram(
    "binserve_request_duration_seconds",
    "Time from receiving a request to its reply.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
# The Flask card's own two metrics (seed 004's Monitoring section), under its names, unlabelled and with
# prometheus_client's default buckets as there, so its dashboards and alerts read binserve unchanged:
# every inference request of every protocol, once (a fan-out is one request), from receipt to reply.
CARD_REQUESTS = Counter("inference_requests_total", "Total inference requests")
CARD_LATENCY = Histogram("inference_latency_seconds", "Inference latency")
# The capability server (POST /classify): requests and texts, and per capability its executions and
# the texts they covered - executions fewer than requests is the batching document 000 promises.
CLASSIFY_REQUESTS = Counter("binserve_classify_requests", "POST /classify requests answered.")
CLASSIFY_TEXTS = Counter("binserve_classify_texts", "Texts of POST /classify requests answered.")
CAPABILITY_EXECUTIONS = Counter(
    "binserve_capability_executions", "Capability executions (one per batch that needs it).", ["capability"]
)
CAPABILITY_TEXTS = Counter("binserve_capability_texts", "Texts capability executions covered.", ["capability"])
QUEUE_DURATION = Histogram(
    "binserve_queue_duration_seconds",
    "Time a request waited before its batch started.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "binserve_inference_duration_seconds",
    "Time of one batch in the model (collate, forward, copy back).",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("binserve_batch_size_samples", "Samples per batch.", ["model"], buckets=BATCH_BUCKETS)
PADDING_RATIO = Histogram(
    "binserve_batch_padding_ratio", "Share of a token batch that is padding.", ["model"], buckets=RATIO_BUCKETS
)
QUEUE_DEPTH = Gauge(
    "binserve_queue_depth_samples", "Samples waiting for a batch.", ["model"], multiprocess_mode="livesum"
)
QUEUE_BACKLOG = Gauge(
    "binserve_queue_backlog_seconds",
    "Queued work in seconds, per model: what is waiting x its recent cost (samples x seconds per sample of "
    "recent batches; generation: waiting sequences x a recent sequence's time / running sequences); summed "
    "over a replica's workers. The autoscaling signal.",
    ["model"],
    multiprocess_mode="livesum",
)
IN_FLIGHT = Gauge("binserve_in_flight_requests", "Inference requests being handled.", multiprocess_mode="livesum")
REQUEST_BYTES = Counter("binserve_request_bytes_total", "Bytes of inference request bodies.", ["model"])
RESPONSE_BYTES = Counter("binserve_response_bytes_total", "Bytes of inference reply bodies.", ["model"])
REJECTED = Counter(
    "binserve_rejected_requests_total",
    "Requests refused or dropped before the model ran them, by reason.",
    ["model", "reason"],
)
MODEL_INFO = Gauge(
    "binserve_model_info",
    "1 for each model version a live worker serves.",
    ["model", "version", "device", "dtype"],
    multiprocess_mode="livemax",
)
READY = Gauge(
    "binserve_ready",
    "1 while every worker of the replica serves all its models and is not draining (what /readyz says), else 0.",
    multiprocess_mode="livemin",
)
RELOADS = Counter("binserve_reloads_total", "Model version switches in a worker, by result.", ["model", "result"])
DEVICE_MEMORY = Gauge(
    "binserve_device_memory_bytes",
    "GPU memory held by torch, summed over workers.",
    ["device"],
    multiprocess_mode="livesum",
)

class RequestSeries:
    """The series every inference request writes when it is answered, each label set bound once
    (`labels()` takes a lock and builds its key on every call; these run on every request). The
    label sets are as bounded as the metrics': served model names, statuses and protocols."""

    def __init__(self) -> None:
        self.in_flight = IN_FLIGHT
        self._bound: dict[tuple, object] = {}

    def _series(self, metric, *labels):
        key = (metric, *labels)
        child = self._bound.get(key)
        if child is None:
            child = self._bound[key] = metric.labels(*labels)
        return child

    def answered(self, models: list[str], label: str, protocol: str, status: int, seconds: float,
                 received: int, sent: int | None, reason: str | None) -> None:  # fmt: skip
        """One request answered: counted and timed under each model that answered it (`models`),
        its bytes and any refusal under `label`; `sent` None for a streamed reply (not counted)."""
        code = str(status)
        for model in models:
            self._series(REQUESTS, model, code, protocol).inc()
            self._series(REQUEST_DURATION, model).observe(seconds)
        CARD_REQUESTS.inc()
        CARD_LATENCY.observe(seconds)
        self._series(REQUEST_BYTES, label).inc(received)
        if sent is not None:
            self._series(RESPONSE_BYTES, label).inc(sent)
        if reason:
            self._series(REJECTED, label, reason).inc()


# Reasons for binserve_rejected_requests_total counted by the HTTP layer, by status; the batcher's
# observer counts the others (overloaded, deadline, client_gone) where they happen.
REASON_BY_STATUS = {413: "too_large", 415: "media_type"}

# The policy layer (binserve/policy): labels are configured key names only, so a caller cannot grow them.
NO_KEY = "_none"  # requests that named no valid key (401) or came to a server without keys
KEY_REQUESTS = Counter(
    "binserve_key_requests_total",
    "Inference requests by API key and outcome (admitted, unauthorized, forbidden, rate_limited).",
    ["key", "outcome"],
)
KEY_TOKENS = Counter("binserve_key_tokens_total", "Tokens charged to an API key: input and generated.", ["key"])
CACHE_REQUESTS = Counter(
    "binserve_cache_requests_total", "Response cache lookups by model and result (hit, miss, bypass).",
    ["model", "result"],
)  # fmt: skip
CACHE_EVICTIONS = Counter(
    "binserve_cache_evictions_total", "Replies dropped from a worker's cache for room.", ["model"]
)
CACHE_BYTES = Gauge("binserve_cache_bytes", "Bytes held by the response caches of live workers.",
                    multiprocess_mode="livesum")  # fmt: skip
CACHE_ENTRIES = Gauge("binserve_cache_entries", "Replies held by the response caches of live workers.",
                      multiprocess_mode="livesum")  # fmt: skip
POLICY_STORE_ERRORS = Counter(
    "binserve_policy_store_errors_total", "Failed calls to the shared policy store (Redis), by use (quota, cache).",
    ["use"],
)  # fmt: skip


#: weight of the newest batch (or token) in the recent costs the backlog gauge multiplies by
RECENT = 0.2


class BatchMetrics:
    """The request batcher's observer for one model (a `scheduling.contract.BatchObserver`): batch
    sizes, padding, inference time, queue, drops, and the queue's backlog in seconds."""

    def __init__(self, model: str) -> None:
        self.model = model
        metrics = (BATCH_SIZE, PADDING_RATIO, INFERENCE_DURATION, QUEUE_DEPTH, QUEUE_BACKLOG)
        self._size, self._padding, self._infer, self._depth, self._backlog = (m.labels(model) for m in metrics)
        self._per_sample = 0.0  # seconds per sample of recent batches (0 until one ran: warm-up runs one)
        self._waiting = 0

    def batch(self, samples: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        """One batch ran."""
        self._size.observe(samples)
        self._infer.observe(seconds)
        if padded_tokens:
            self._padding.observe(1 - real_tokens / padded_tokens)
        if samples:
            cost = seconds / samples
            self._per_sample = cost if not self._per_sample else (1 - RECENT) * self._per_sample + RECENT * cost
            self._backlog.set(self._waiting * self._per_sample)

    def queue_depth(self, samples: int) -> None:
        """Samples now waiting."""
        self._waiting = samples
        self._depth.set(samples)
        self._backlog.set(samples * self._per_sample)

    def dropped(self, reason: str) -> None:
        """A request left the queue without running (deadline, client_gone) or was refused."""
        REJECTED.labels(self.model, reason).inc()


TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TIME_TO_FIRST_TOKEN = Histogram(
    "binserve_time_to_first_token_seconds",
    "From a generation request's arrival to its first token.",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "binserve_inter_token_latency_seconds",
    "Between consecutive tokens of one sequence.",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
GENERATED_TOKENS = Counter("binserve_generated_tokens_total", "Tokens generated.", ["model"])
GENERATION_REQUESTS = Counter("binserve_generation_requests_total", "Generation requests that ran.", ["model"])
GENERATION_SECONDS = Counter(
    "binserve_generation_seconds_total", "Time generation requests ran, from queueing to their last token.", ["model"]
)
RUNNING_SEQUENCES = Gauge(
    "binserve_running_sequences", "Sequences being generated.", ["model"], multiprocess_mode="livesum"
)
WAITING_SEQUENCES = Gauge(
    "binserve_waiting_sequences", "Sequences waiting to start.", ["model"], multiprocess_mode="livesum"
)


class GenerationMetrics:
    """The continuous batcher's observer for one model (a `scheduling.contract.GenerationObserver`):
    token timings, sequence counts, refusals."""

    def __init__(self, model: str) -> None:
        self.model = model
        metrics = (TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, GENERATED_TOKENS, RUNNING_SEQUENCES, WAITING_SEQUENCES)
        self._ttft, self._itl, self._tokens, self._running, self._waiting = (m.labels(model) for m in metrics)
        self._backlog = QUEUE_BACKLOG.labels(model)
        self._gap = 0.0  # recent seconds between a sequence's tokens
        self._firsts = self._all = 0  # sequences started and tokens generated: tokens per sequence

    def token(self, ttft_s: float | None, itl_s: float | None) -> None:
        """A token was generated: its time since arrival if first, else since the previous one."""
        self._tokens.inc()
        self._all += 1
        if ttft_s is not None:
            self._ttft.observe(ttft_s)
            self._firsts += 1
        if itl_s is not None:
            self._itl.observe(itl_s)
            self._gap = itl_s if not self._gap else (1 - RECENT) * self._gap + RECENT * itl_s

    def counts(self, running: int, waiting: int) -> None:
        """Sequences running and waiting now."""
        self._running.set(running)
        self._waiting.set(waiting)
        # a waiting sequence starts when a running one ends: the queue drains `running` at a time
        per_sequence = self._gap * self._all / self._firsts if self._firsts else 0.0
        self._backlog.set(waiting * per_sequence / max(running, 1))

    def dropped(self, reason: str) -> None:
        """A sequence was refused (overloaded)."""
        REJECTED.labels(self.model, reason).inc()


def set_model_info(model: str, version: str, device: str, dtype: str, old_version: str | None = None) -> None:
    """Mark `version` as served by this worker (and `old_version`, if any, as no longer)."""
    if old_version is not None and old_version != version:
        MODEL_INFO.labels(model, old_version, device, dtype).set(0)
    MODEL_INFO.labels(model, version, device, dtype).set(1)


def set_ready(ready: bool) -> None:
    """This worker's readiness: the replica's is the least over its live workers."""
    READY.set(1 if ready else 0)


def clear_model_info(model: str, version: str, device: str, dtype: str) -> None:
    """This worker no longer serves the model (unloaded)."""
    MODEL_INFO.labels(model, version, device, dtype).set(0)


def _registry():
    """What a scrape reads: every worker's files under Gunicorn, else this process's registry."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def exposition() -> tuple[bytes, str]:
    """The /metrics body (all workers' values under Gunicorn) and its Content-Type."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def totals_by(label: str, values: list[str], sample_names: set[str]) -> dict[str, dict[str, float]]:
    """The named samples summed over every worker and every other label, per value of `label`
    (`totals_by("model", names, ...)`), in one pass over the metric files."""
    out = {v: dict.fromkeys(sample_names, 0.0) for v in values}
    for family in _registry().collect():
        for sample in family.samples:
            if sample.name in sample_names:
                per = out.get(sample.labels.get(label))
                if per is not None:
                    per[sample.name] += sample.value
    return out


def totals(sample_names: set[str], **labels: str) -> dict[str, float]:
    """The named samples summed over every worker (and label set matching `labels`): the server's
    totals, whichever worker is asked."""
    out = dict.fromkeys(sample_names, 0.0)
    for family in _registry().collect():
        for sample in family.samples:
            if sample.name in out and all(sample.labels.get(k) == v for k, v in labels.items()):
                out[sample.name] += sample.value
    return out
