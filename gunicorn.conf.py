"""Gunicorn settings for binserve: plain assignments from ServerConfig, and the worker hooks.

gthread workers: one process holds many request threads, which is what lets one process's batcher
see many concurrent requests. preload_app stays off so that models and CUDA initialise in each
worker after the fork, never in the master.
"""

import os

from config import ServerConfig

_config = ServerConfig.from_env()

bind = f"{_config.host}:{_config.port}"
workers = _config.workers
worker_class = "gthread"
threads = _config.threads
preload_app = False
# Models load on a background thread, so the worker heartbeat is never blocked for long.
timeout = 120
graceful_timeout = 30
keepalive = 5
loglevel = _config.log_level
# Gunicorn 27's control socket lives at one path per user; several servers (tests, replicas on one
# host) would fight over it, and binserve does not use it.
control_socket_disable = True
accesslog = None
errorlog = "-"


def post_fork(server, worker):
    """Give each worker an index: it picks GPU index mod N (runtime.select_device)."""
    os.environ["BINSERVE_WORKER_INDEX"] = str(max(0, worker.age - 1))
