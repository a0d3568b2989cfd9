"""Observability: the Prometheus metric definitions and the archive of dead workers' metrics."""
