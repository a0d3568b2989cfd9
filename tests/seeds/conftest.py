"""The source documents' own client code and tests, copied verbatim into `verbatim/` (one folder per
document), run against real Gunicorn started with each document's own command line.

`verbatim/` is not collected by this suite: its files are the documents' programs, run as their
users run them (`python -m unittest ...`) by the tests here, once the server they expect is up.
When the documents themselves are present (`../shared/seeds/` beside the checkout, as in CI), a test
checks that each copy is still exactly the document's text.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

collect_ignore = ["verbatim"]

ROOT = Path(__file__).resolve().parents[2]
VERBATIM = Path(__file__).resolve().parent / "verbatim"
SEEDS = ROOT.parent / "shared" / "seeds"


def document(prefix: str) -> str:
    """The text of the source document whose file name starts with `prefix` (skip when absent)."""
    found = sorted(SEEDS.glob(f"{prefix}_*.txt")) if SEEDS.is_dir() else []
    if not found:
        pytest.skip(f"the source documents are not beside this checkout ({SEEDS})")
    return found[0].read_text()


def code_block(doc: str, after: str, lang: str = "python") -> str:
    """The first fenced `lang` block after the line containing `after`."""
    start = doc.index(f"```{lang}\n", doc.index(after)) + len(f"```{lang}\n")
    return doc[start : doc.index("```", start)]


def port_free(port: int) -> bool:
    """Whether nothing listens on `port` of loopback (the documents name fixed ports)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
