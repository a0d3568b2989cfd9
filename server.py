"""The binserve app: the HTTP layer's blueprints composed on one pipeline and one error mapping.

design: `binserve/api/` holds one blueprint per protocol - native `/infer`, Open Inference Protocol V2
(`/v2`, tritonclient and KServe), OpenAI-compatible `/v1`, admin and health - all calling the
shared request pipeline (`binserve/api/pipeline.py`: read, authorize, validate, submit to the model's
batcher, wait, time) and answering errors through `binserve/api/failures.py`. The worker bootstrap (threads,
device, model manager) is `binserve/serving/bootstrap.py`.

`gunicorn -c gunicorn.conf.py server:app` serves the module-level `app` (created on first access,
inside each worker, so models and CUDA are never initialised in the Gunicorn master);
`python server.py --port 8000 ...` starts exactly that with the flags passed on as env vars.
"""

from __future__ import annotations

import os
import sys

from flask import Flask

from binserve.api import admin, docs, failures, health, native, openai_compat, openai_generate, seed, v2
from binserve.api.hooks import install_hooks
from binserve.api.pipeline import Pipeline
from binserve.config import ServerConfig
from binserve.policy.gate import Policy
from binserve.process import coreshare


def create_app(config: ServerConfig | None = None, *, manager=None) -> Flask:
    """Build the Flask app for `config` (default: from BINSERVE_* env); models load in the background.

    `manager` is anything with ModelManager's interface (tests pass a small fake); None starts this
    worker's own (`bootstrap.start_worker`).
    """
    config = config or ServerConfig.from_env()
    policy = Policy.from_config(config)  # a bad keys file or origin stops the worker before any model loads
    if manager is None:
        from binserve.serving.bootstrap import start_worker  # torch and the models: only in a serving process

        manager = start_worker(config)
    app = Flask("binserve")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["binserve"] = manager
    pipeline = Pipeline(config, manager, policy)
    install_hooks(app, config, policy)
    for bp in (
        native.blueprint(pipeline),
        v2.blueprint(pipeline),
        openai_compat.blueprint(pipeline),
        openai_generate.blueprint(pipeline),
        seed.blueprint(pipeline),
        admin.blueprint(pipeline),
        health.blueprint(manager),
        docs.blueprint(page=config.docs),
    ):
        app.register_blueprint(bp)
    failures.install(app, {v2.PREFIX: v2.error_body, openai_compat.PREFIX: openai_compat.error_body})
    return app


def __getattr__(name: str):
    # `gunicorn server:app` reads this attribute inside each worker (preload_app is off), so the
    # models load after the fork; importing server.py for create_app loads nothing.
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> None:
    """`python server.py [--flags]`: run Gunicorn with gunicorn.conf.py and this config."""
    config = ServerConfig.from_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, **config.to_env()}
    workers = coreshare.worker_count(config.workers)
    print(
        f"binserve: starting {workers} Gunicorn worker(s) on http://{config.host}:{config.port} "
        f"(models: {config.models or 'minilm (default)'}); ready when GET /readyz answers 200",
        flush=True,
    )
    os.chdir(here)
    os.execvpe(sys.executable, [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "server:app"], env)


if __name__ == "__main__":
    main()
