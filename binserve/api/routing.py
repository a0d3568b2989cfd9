"""The `<model:...>` URL converter: a model name in a route, a hub id `org/name` included.

design: model names may be Hugging Face hub ids (the encoder server's `wandb/WeaveFluencyScorerV1`),
so a model segment may span one `/`. Werkzeug's own `path` converter would swallow the segments after
it (`/v2/models/a/ready` could read as model `a/ready`), so this one takes at most two segments and
never a second one that is a V2 route word (`ready`, `versions`, `infer`, `load`, `unload`): a hub
model whose name is one of those words is served on every route that carries the name in its body,
and by its plain name's routes. Whether the name is served is the manager's to say (404), not the URL's.
"""

from __future__ import annotations

from werkzeug.routing import BaseConverter

_ROUTE_WORDS = ("ready", "versions", "infer", "load", "unload")


class ModelConverter(BaseConverter):
    """A model name in a URL: one segment, or two (`org/name`)."""

    regex = r"[^/]+(?:/(?!(?:" + "|".join(_ROUTE_WORDS) + r")(?:/|$))[^/]+)?"
    part_isolating = False
    weight = 150  # after static parts and plain strings


def install(app) -> None:
    """Register the converter on `app` (before its blueprints add their rules)."""
    app.url_map.converters["model"] = ModelConverter
