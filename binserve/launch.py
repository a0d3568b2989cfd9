"""Gunicorn settings for binserve: plain assignments from ServerConfig, and the worker hooks.

design: a module, so that Gunicorn finds it wherever binserve is installed (`gunicorn -c
python:binserve.launch server:app`, which `python server.py` and the `binserve` command run); the
top-level `gunicorn.conf.py` re-exports it for `gunicorn -c gunicorn.conf.py server:app` in a
checkout or the image. It sits at the top of the package: it reads the settings and checks the
policy layer's files in the master, before any worker forks.

Workers are gthread with request buffering (`binserve.process.http_worker.BufferingWorker`): one process holds many
request threads, which is what lets one process's batcher see many concurrent requests, and a
request reaches a thread only once it has arrived whole, so slow clients cannot hold threads.
preload_app stays off so that models and CUDA initialise in each worker after the fork, never in
the master.
"""

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from binserve.capabilities.config import CapabilityConfig
from binserve.config import PATH_IMPORTS_OFF, ServerConfig
from binserve.policy import buckets
from binserve.policy.cors import Cors
from binserve.policy.keys import KeyRing
from binserve.process import coreshare
from models.layout import detect_adapter

# prometheus_client's multiprocess mode: every worker writes its metrics to files in this
# directory, and a scrape of any worker reads all of them. It must be in the environment before
# any worker imports prometheus_client, so it is set here, in the master, before the fork.
# Nothing here may import prometheus_client before this line: it picks its value class (in memory,
# or files in this directory) once, at import, and the workers inherit that choice.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="binserve-metrics-"))
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)  # e.g. /tmp/metrics on an emptyDir

_config = ServerConfig.from_env()
if _config.served_model_path:  # a directory that holds no model stops the server now, naming what it holds
    try:
        detect_adapter(_config.served_model_path)
    except (OSError, ValueError) as _exc:
        raise SystemExit(f"binserve: --model-path: {_exc}") from None
# when the server started, for the seed API's /stats uptime (every worker inherits it)
os.environ["BINSERVE_SERVER_STARTED"] = str(time.time())

# A capability server's configuration is checked here too: a bad file stops the server naming the field.
if _config.config:
    try:
        CapabilityConfig.from_file(_config.config)
    except ValueError as _exc:
        raise SystemExit(f"binserve: --config: {_exc}") from None

# The cores' share between workers' running batches lives in shared memory made here, in the
# master, so that every worker forked from it sees the same slots (coreshare.py).
coreshare.create()

# API keys and origins are checked here, so a bad keys file stops the server at once with its reason
# (not each worker in turn); the quota buckets are shared memory every worker inherits, as above.
KeyRing.configured(_config.api_keys_file, _config.auth_token)
Cors(_config.cors_allow_origins)
buckets.create()

# torch's OpenMP threads (GNU libgomp) spin ~300k iterations after each parallel region before they
# sleep. Inside one forward that keeps them hot between ops; between batches the spinning steals
# the cores that request threads need for HTTP, decoding and tokenizing. Measured on the 2-core
# dev machine with MiniLM (bench/RESULTS.md): 5000 gives +20% req/s at 64 concurrent clients and
# ~1 ms lower p50 for a lone request than the default; 0 (passive) makes lone requests slower.
# Set here, in the master, so each worker's libgomp reads it when torch loads after the fork.
os.environ.setdefault("GOMP_SPINCOUNT", "5000")

# torch's oneDNN (ideep) keeps a compiled primitive per input shape, up to 1024 of them in each of two
# caches; the batches' shapes vary (rows x padded length), so a worker running a torch engine grew
# for as long as new shapes came. Measured (MiniLM on torch-bf16, 2 workers, c=32, 12k requests after
# 8k of warm-up): RSS +18% and +25% with the defaults, +2.4% and +3.1% with 64 each, and the same
# req/s and p50 (interleaved A/B, 4 rounds: 1.01x at c=1, 0.99x at c=32). Set here, in the master,
# so each worker's torch reads them when it loads after the fork.
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

bind = [f"{_config.host}:{_config.port}"]
if _config.admin_port:  # /update_model and /metrics answer only here (see binserve/api/admin.py)
    bind.append(f"{_config.host}:{_config.admin_port}")
workers = coreshare.worker_count(_config.workers)
worker_class = "binserve.process.http_worker.BufferingWorker"
threads = _config.threads
preload_app = False
# Models load on a background thread and inference runs on the batcher's, so the heartbeat (the
# worker's main loop) is late only when the worker hangs or is stopped: then the master kills it.
timeout = int(_config.worker_timeout_s)
graceful_timeout = int(_config.graceful_timeout_s)
keepalive = 5
# Last line of defence against memory growth; off by default, since each restart reloads the models.
max_requests = _config.max_requests
max_requests_jitter = _config.max_requests // 10
loglevel = _config.log_level
# Gunicorn 27's control socket lives at one path per user; several servers (tests, replicas on one
# host) would fight over it, and binserve does not use it.
control_socket_disable = True
accesslog = None
errorlog = "-"


def on_starting(server):
    """Wipe metric files left by an earlier run that used the same directory; say what is off."""
    for f in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        f.unlink()
    if not _config.import_root:
        server.log.info(PATH_IMPORTS_OFF)


def child_exit(server, worker):
    """Drop a dead worker's live gauges and fold its counters and histograms into the archives, so
    the directory stays bounded however often workers restart and no total goes backwards; free its
    share of the cores (it may have died mid-batch)."""
    coreshare.clear(max(0, worker.age - 1))
    from binserve.observability import archive  # imported here, after PROMETHEUS_MULTIPROC_DIR is set

    try:
        archive.archive_dead_process(worker.pid)
    except Exception:  # metrics must never stop the master from replacing a worker
        server.log.exception("could not archive the metrics of worker %s", worker.pid)


def post_worker_init(worker):
    """On SIGTERM, report not-ready first, then let Gunicorn drain as usual.

    Gunicorn's gthread worker stops accepting and finishes accepted requests within
    graceful_timeout; /readyz answering 503 meanwhile tells a load balancer to stop sending. With
    drain_delay_s, the worker goes on accepting for that long first: a load balancer that only
    health-checks would otherwise still send requests after the listener closed, and those that
    reached the kernel's accept queue would be reset (measured behind HAProxy: 12 client retries
    in a rolling restart of three replicas without it, 0 with it).
    """
    manager = worker.wsgi.extensions["binserve"]
    gunicorn_handler = signal.getsignal(signal.SIGTERM)

    delayed = []

    def on_sigterm(signum, frame):
        manager.start_draining()
        if _config.drain_delay_s and not delayed:  # a second SIGTERM does not wait again
            delayed.append(threading.Timer(_config.drain_delay_s, gunicorn_handler, (signum, frame)))
            delayed[0].daemon = True
            delayed[0].start()
        else:
            gunicorn_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def worker_exit(server, worker):
    """After the last request: finish what the batchers hold and drop this worker's reports."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        app.extensions["binserve"].close()


def post_fork(server, worker):
    """Give each worker an index (it picks GPU index mod N), an allocator that gives memory back, and
    binserve's log lines where Gunicorn's go - before the app loads, so what the model manager says
    while it starts (registering the configured models) is not lost."""
    import logging

    ours = logging.getLogger("binserve")
    ours.handlers = list(worker.log.error_log.handlers)
    ours.setLevel(worker.log.error_log.level)
    ours.propagate = False
    os.environ["BINSERVE_WORKER_INDEX"] = str(max(0, worker.age - 1))
    # how many workers this server runs, as Gunicorn was told (flags included): /readyz waits for all
    os.environ["BINSERVE_WORKER_COUNT"] = str(server.cfg.workers)
    from binserve.process.memory import configure_allocator

    configure_allocator()  # before the request threads exist
