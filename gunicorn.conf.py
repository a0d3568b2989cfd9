"""Gunicorn settings for `gunicorn -c gunicorn.conf.py server:app`: binserve's own, from binserve/launch.py.

Gunicorn reads a config file's module-level names; these are the settings and hooks that module
defines (an installed binserve finds the same module as `-c python:binserve.launch`).
"""

from binserve.launch import *  # noqa: F403 - every setting and hook, as Gunicorn reads them
