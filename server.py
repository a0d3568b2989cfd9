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

from binserve.api import (
    admin,
    classify,
    docs,
    failures,
    health,
    native,
    openai_compat,
    openai_generate,
    predict,
    routing,
    seed,
    v2,
)
from binserve.api.hooks import install_hooks
from binserve.api.pipeline import Pipeline
from binserve.config import PATH_IMPORTS_OFF, ServerConfig
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
    routing.install(app)  # model names in URLs may be hub ids (org/name)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["binserve"] = manager
    pipeline = Pipeline(config, manager, policy)
    capabilities = None
    if config.config:  # a bad file stops the worker naming the field (the master checked it first)
        from binserve.capabilities.service import CapabilityService  # the executor's models: a serving process

        capabilities = CapabilityService.configured(config, manager)
    install_hooks(app, config, policy)
    for bp in (
        native.blueprint(pipeline),
        predict.blueprint(pipeline),
        classify.blueprint(pipeline, capabilities),
        v2.blueprint(pipeline),
        openai_compat.blueprint(pipeline),
        openai_generate.blueprint(pipeline),
        seed.blueprint(pipeline),
        admin.blueprint(pipeline),
        health.blueprint(manager, config.import_root, config.models_listing),
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


def banner(config: ServerConfig) -> str:
    """What the server will serve: the model repository and each configured model's version and path
    (read only: the workers register them as they start)."""
    from binserve.capabilities.config import served_models
    from binserve.serving.repository import ModelRepository  # loads torch: only in the launcher
    from models.registry import configured_specs

    root = os.path.abspath(config.repository_root)
    try:
        specs = configured_specs(served_models(config.models, config.config), config.served_model_path)
        repo = ModelRepository(root)
        lines = [f"  {repo.preview(spec)}" for spec in specs]
    except (OSError, ValueError) as exc:
        lines = [f"  (cannot read the configuration or the repository: {exc})"]
    imports = f"path imports from {config.import_root}" if config.import_root else PATH_IMPORTS_OFF
    return f"model repository {root}:\n" + "\n".join(lines) + f"\n{imports}"


def main(argv: list[str] | None = None) -> None:
    """`python server.py [--flags]` or the `binserve` command: run Gunicorn with binserve's settings
    (binserve/launch.py) and this config, in the current directory (relative paths are the caller's)."""
    config = ServerConfig.from_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, **config.to_env()}
    # a checkout run from elsewhere: its modules must stay importable for Gunicorn and the workers
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    workers = coreshare.worker_count(config.workers)
    print(
        f"binserve: starting {workers} Gunicorn worker(s) on http://{config.host}:{config.port}; "
        f"ready when GET /readyz answers 200\n{banner(config)}",
        flush=True,
    )
    os.execvpe(sys.executable, [sys.executable, "-m", "gunicorn", "-c", "python:binserve.launch", "server:app"], env)


if __name__ == "__main__":
    main()
