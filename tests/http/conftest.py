"""Fixtures for in-process HTTP tests: the real app on a FakeManager, through Flask's test client."""

from __future__ import annotations

import pytest

from binserve.config import ServerConfig
from server import create_app
from tests.conftest import GENERATION_BACKENDS
from tests.http.fakes import FakeManager, add_tiny_lm


@pytest.fixture
def manager():
    m = FakeManager()
    yield m
    m.close()


@pytest.fixture
def make_client(manager):
    """A test client for an app with the given settings (auth tokens, admin port, limits)."""

    def make(**settings):
        app = create_app(ServerConfig(**settings), manager=manager)
        return app.test_client()

    return make


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    from models.examples.causal_lm import write_causal_lm

    return write_causal_lm(tmp_path_factory.mktemp("lm") / "tiny", layers=2, hidden=64)


@pytest.fixture(params=GENERATION_BACKENDS)
def lm_manager(request, manager, lm_dir, tmp_path_factory):
    """The fakes plus model "lm": the example causal LM on a real generation backend, each in turn
    (never stopping at an end-of-sequence token). Its backend records every submitted sequence in
    `.submitted`."""
    add_tiny_lm(manager, lm_dir, request.param, str(tmp_path_factory.getbasetemp() / "ov-cache"))
    manager.backend = request.param
    return manager
