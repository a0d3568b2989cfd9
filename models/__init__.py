"""Model adapters: `base.ModelAdapter` is the contract, `registry` maps adapter names to classes."""

import os

# Models load from local directories only; never let transformers reach for a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
