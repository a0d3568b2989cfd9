"""Who may call what, how much, and what need not run twice: API keys, quotas, the response cache
and CORS, one policy layer that every protocol's routes pass through (binserve/api/pipeline.py)."""
