"""Serving state: the models a worker serves, the repository they follow, model control, worker bootstrap."""
