"""Media types: the one place a Content-Type header is read (the app, the buffering worker, the codec).

design: JSON has its own, smaller size limit, decided in the worker's event loop from the raw
header bytes and again in the app from the parsed header, and the codec picks a body's format by
the same rule, so all three must agree on what names JSON; they call these.
"""

from __future__ import annotations


def media_type(content_type: str | bytes | None) -> str:
    """The bare media type of a Content-Type header (`application/json; charset=utf-8` ->
    `application/json`), lower case; raw header bytes are read as Latin-1, as HTTP/1.1 headers are."""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(content_type: str | bytes | None) -> bool:
    """Whether a Content-Type names JSON (`application/json`, or any `+json` type)."""
    media = media_type(content_type)
    return media == "application/json" or media.endswith("+json")


def json_limit_hint(max_body_bytes: int) -> str:
    """What the 413 of a JSON body over `max_json_bytes` adds: where larger inputs go instead."""
    return (f" (max_json_bytes); the binary formats - framed, pickle, V2's binary tensors, a raw image - "
            f"may be up to {max_body_bytes} bytes (max_body_bytes)")  # fmt: skip
