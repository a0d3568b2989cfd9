"""Fixtures for in-process HTTP tests: the real app on a FakeManager, through Flask's test client."""

from __future__ import annotations

import pytest

from binserve.config import ServerConfig
from server import create_app
from tests.http.fakes import FakeManager


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
