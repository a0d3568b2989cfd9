"""The replica bed reloads to the image tests' second MiniLM version."""

from tests.container.test_image import version_two  # noqa: F401 - a fixture, found by name
