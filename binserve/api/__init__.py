"""The HTTP layer: one Flask blueprint per protocol, all on one request pipeline and one error mapping.

design: `pipeline` reads, authorizes, submits to a model's batcher, waits and times a request;
`failures` maps every error to a status and a body in the shape the caller's protocol expects;
`native` (/infer), `v2` (Open Inference Protocol, tritonclient), `openai_compat` (/v1), `admin`
(/update_model, /metrics) and `health` (/healthz, /readyz, /models) only translate wire shapes.
`server.create_app` composes them. The routes see the serving state only through the protocols of
`serving/contract.py`, so nothing here imports torch or transformers (tests/unit/test_contracts.py).
"""
