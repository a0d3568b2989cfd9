"""binserve's internals, one sub-package per concern (the card's top-level files are the public face).

design: `api` (one Flask blueprint per protocol on one pipeline) calls `serving` (model manager,
repository, model control, worker bootstrap), which feeds `scheduling` (the request batcher and the
continuous batcher, behind one contract) with the adapters of `models/`; below them `wire` (the safe
pickle VM), `process` (Gunicorn worker, devices, threads and cores) and `observability` (metrics);
`config` and `errors` are at the bottom, and `launch` (Gunicorn's settings and master hooks) at
the top, beside `api`. No import runs upward. Importing this package loads
nothing: each sub-package is imported where it is needed.
"""
