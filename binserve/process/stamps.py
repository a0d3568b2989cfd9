"""When the request a thread runs arrived: stamps the buffering worker sets and the app reads.

design: `Server-Timing` accounts for a request from the moment the event loop had it whole:
`wait` (until a request thread took it) and `parse` (Gunicorn's parser and the WSGI call, until
the app's first hook) come before the app's own stages. The worker stamps them in a thread-local
as the request thread starts (`mark`), the app reads them (`since_arrival`); outside the buffering
worker (tests, other servers) there are none and the stages are left out. Only `time.monotonic`.
"""

from __future__ import annotations

import threading
import time

_current = threading.local()


def mark(arrived: float | None) -> None:
    """The calling request thread starts a request the event loop completed at `arrived` (monotonic)."""
    _current.arrived = arrived
    _current.dispatched = time.monotonic()


def since_arrival() -> tuple[float, float] | None:
    """(arrived, dispatched) of the calling thread's request, or None where no worker stamped it."""
    arrived = getattr(_current, "arrived", None)
    return None if arrived is None else (arrived, _current.dispatched)
