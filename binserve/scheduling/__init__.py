"""Scheduling: what turns queued requests into model calls (the request batcher, the continuous batcher)."""
