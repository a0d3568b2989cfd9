"""README.md's examples, run as written against a real server, so the docs cannot drift from the code.

Every ```bash and ```python block of README.md runs, in the README's order, against the server its
own recipe starts (`make examples`, then `make serve-examples`, with PORT set to a free port), unless
the HTML comment on the line before it says otherwise:
- `<!-- readme-test: skip (why) -->`: not run; the reason becomes the skip's (Docker, a command that
  runs until stopped, the set-up commands that CI runs itself);
- `<!-- readme-test: keys-file ... -->` on a ```json block: the API keys file the blocks marked
  `<!-- readme-test: keys -->` need; those run against a second server started with it (`make serve
  ARGS="--api-keys-file keys.json"`, as the README says).
Other ```json blocks are data, not commands. The only change made to a block is the address: the
README's `127.0.0.1:8000` becomes the test server's port (and `BASE`/`PORT` are set in the shell).
Bash runs with `-euo pipefail` and curl failing on an HTTP error (`--fail-with-body`), so an example
that got a 4xx fails here; Python blocks run with the checkout's Python, in the checkout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.serverproc import ROOT, free_port, poll

pytestmark = pytest.mark.slow
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(\S+)(.*?)-->")


@dataclass(frozen=True)
class Block:
    """One fenced block of the README: its language, code, line, and its marker (kind, text)."""

    lang: str
    code: str
    line: int
    kind: str  # "run", "skip", "keys", "keys-file", "data"
    why: str


def blocks(text: str) -> list[Block]:
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        indent, lang, start = opening.group(1), opening.group(2), i
        i += 1
        body = []
        while not re.match(rf"^{indent}```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        marker = MARKER.search(lines[start - 1]) if start else None
        kind, why = (marker.group(1), marker.group(2).strip(" ()")) if marker else ("run", "")
        if lang not in ("bash", "python") and kind == "run":
            kind = "data"
        out.append(Block(lang, textwrap.dedent("\n".join(body)) + "\n", start + 1, kind, why))
    return out


BLOCKS = blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.kind != "data"]


def test_every_block_is_run_or_says_why_not():
    for b in BLOCKS:
        assert b.kind in ("run", "skip", "keys", "keys-file", "data"), f"README line {b.line}: marker {b.kind!r}"
        assert b.kind != "skip" or b.why, f"README line {b.line}: a skipped block must say why"
        assert b.kind != "data" or b.lang not in ("bash", "python", "sh", "shell", ""), f"README line {b.line}"
    assert sum(b.kind == "run" for b in BLOCKS) >= 10
    assert [b.kind for b in BLOCKS].count("keys-file") == 1


class Server:
    """A server started by a make command as a user would, in a session of its own; stopped by its group."""

    def __init__(self, args: list[str], repository: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BINSERVE_")}
        env |= {"PORT": str(self.port), "WORKERS": "1", "BINSERVE_MODEL_REPOSITORY": str(repository)}
        self.log = open(repository.parent / f"server-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(["make", "--no-print-directory", *args], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def wait_ready(self) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                return requests.get(f"{self.base}/readyz", timeout=2).status_code == 200
            except (requests.ConnectionError, requests.Timeout):
                return False  # not listening yet, or a worker still booting (its imports) holds the connection

        poll(ready, timeout_s=600, every_s=0.5)

    def stop(self) -> None:
        if self.proc.poll() is not None:  # it exited by itself (wait_ready said why)
            self.log.close()
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The examples server (the README's recipe), and the keys server when a block asks for it."""
    root = tmp_path_factory.mktemp("readme")
    subprocess.run(["make", "--no-print-directory", "examples"], cwd=ROOT, check=True, capture_output=True)
    started = {"examples": Server(["serve-examples"], root / "repository")}
    keys = next((b for b in BLOCKS if b.kind == "keys-file"), None)
    if keys is not None:
        (root / "keys.json").write_text(keys.code)
        started["keys"] = Server(["serve", f"ARGS=--api-keys-file {root / 'keys.json'}"], root / "keys-repository")
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.stop()


def run(block: Block, server: Server) -> subprocess.CompletedProcess:
    code = block.code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    env = os.environ | {"BASE": server.base, "PORT": str(server.port), "PYTHONPATH": str(ROOT)}
    if block.lang == "bash":
        prelude = 'curl() { command curl --fail-with-body "$@"; }\n'
        cmd = ["bash", "-euo", "pipefail", "-c", prelude + code]
    else:
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{b.line}-{b.lang}" for b in RUNNABLE])
def test_readme_block(block, servers):
    if block.kind == "skip":
        pytest.skip(block.why)
    if block.kind == "keys-file":
        pytest.skip("the keys file itself: the blocks marked keys run against a server started with it")
    result = run(block, servers["keys" if block.kind == "keys" else "examples"])
    assert result.returncode == 0, (
        f"README line {block.line} ({block.lang}) failed with {result.returncode}:\n{block.code}\n"
        f"--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
