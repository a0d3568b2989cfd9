"""OpenAI-compatible generation: `POST /v1/completions` and `POST /v1/chat/completions`, streamed
as server-sent events with `stream: true`.

design: the route renders the prompt (the tokenizer's chat template for chat), checks the sampling
settings, and hands one `Sequence` to the model's continuous batcher; it then either
waits for the whole text or relays each token's text as a `data: {...}` chunk, ending with
`data: [DONE]`. A client that disconnects mid-stream stops its sequence at the next step: the
stream's generator is closed (or the batcher sees the socket gone), and either cancels the
sequence. One request, one choice (`n` = 1); `usage` counts prompt and generated tokens.
"""

from __future__ import annotations

import json
import time
import uuid

from flask import Blueprint, Response

from binary_protocol import dict_to_json
from binserve.api import logprobs
from binserve.api.failures import failure_of
from binserve.api.generation import SSE_HEADERS, Generation
from binserve.api.hooks import inference_view
from binserve.api.openai_compat import error_body
from binserve.api.pipeline import Pipeline
from binserve.errors import BadRequest, ServingError

_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options"}
_COMMON |= {"n", "user", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty"}
_FIELDS = {"completions": _COMMON | {"prompt", "echo"},
           "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}}  # fmt: skip
# accepted only at their neutral value: binserve does not implement them
_NEUTRAL = {"echo": (False,)}
#: the most choices (`n`) one request may ask for: each is a sequence in the batch
MAX_CHOICES = 16


def _body(pipeline: Pipeline, kind: str) -> dict:
    body = pipeline.json_object()
    unknown = sorted(set(body) - _FIELDS[kind])
    if unknown:
        raise BadRequest(f"unknown fields {unknown}")
    for key, allowed in _NEUTRAL.items():
        if body.get(key) is not None and body[key] not in allowed:
            raise BadRequest(f"'{key}' is not supported here (only {allowed[0]!r})")
    _choices(body)  # the request's own shape first, before the model is looked up
    return body


def _prompt(adapter, body: dict, kind: str) -> list[int]:
    if kind == "chat":
        return adapter.chat_prompt(body.get("messages"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return adapter.text_prompt(prompt)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    raise BadRequest("'prompt' must be a string, or a list of token ids (one prompt per request)")


def _logprobs_asked(body: dict, kind: str) -> int | None:
    """How many alternatives per token the request wants logprobs of; None: no logprobs. Completions
    take `logprobs: N`; chat takes `logprobs: true` and `top_logprobs: N` (OpenAI's API)."""
    if kind == "completions":
        n = body.get("logprobs")
        if n is not None and type(n) is not int:
            raise BadRequest(f"'logprobs' must be an int (alternatives per token) on /v1/completions, got {n!r}")
        return n
    asked, top = body.get("logprobs"), body.get("top_logprobs")
    if asked not in (None, True, False):
        raise BadRequest(f"'logprobs' must be true or false on /v1/chat/completions, got {asked!r}")
    if top is not None and not asked:
        raise BadRequest("'top_logprobs' needs 'logprobs': true")
    if top is not None and type(top) is not int:
        raise BadRequest(f"'top_logprobs' must be an int, got {top!r}")
    return (top or 0) if asked else None


def _chunk(rid, kind, model, created, text: str | None, finish: str | None, first=False, logprobs=None, index=0):
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    return (
        "data: "
        + json.dumps({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]})
        + "\n\n"
    )


def _reply(rid, kind, model, created, dones: list[dict], prompt_tokens: int, lps: list | None = None) -> Response:
    """A whole (not streamed) completion of every choice, from what generation made (or the cache kept)."""
    choices = []
    for i, done in enumerate(dones):
        text, finish, lp = done["text"], done["finish_reason"], lps[i] if lps else None
        if kind == "chat":
            message = {"role": "assistant", "content": text}
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
        else:
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
    completion = sum(int(d["completion_tokens"]) for d in dones)
    total = prompt_tokens + completion
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": total}
    reply = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
             "model": model, "choices": choices, "usage": usage}  # fmt: skip
    return Response(dict_to_json(reply), content_type="application/json", headers={"X-Model": model})


def _choices(body: dict) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if type(n) is not int or not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"'n' must be an int in [1, {MAX_CHOICES}], got {n!r}")
    return n


def _any_model(pipeline: Pipeline, name: str) -> str:
    """`name`, or - with the `openai_any_model` setting, for a name no model has - the one served
    generative model (LitServe's OpenAI example: `model="smol-lm"  # Model name doesn't matter`)."""
    manager = pipeline.manager
    if not pipeline.config.openai_any_model or name in manager.names:
        return name
    generative = [m.name for m in manager.served() if m.adapter.generates]
    return generative[0] if len(generative) == 1 else name  # none or several: the name must say which


def blueprint(pipeline: Pipeline) -> Blueprint:
    """The generation routes under /v1 on `pipeline`."""
    bp = Blueprint("openai_generate", __name__, url_prefix="/v1")

    def generate(kind: str):
        pipeline.admit("generate")
        body = _body(pipeline, kind)
        name = body.get("model")
        if not isinstance(name, str):
            raise BadRequest("'model' must name a served model (GET /v1/models lists them)")
        loaded = pipeline.model(_any_model(pipeline, name))
        name = loaded.name  # the replies name the model that answered
        adapter = loaded.adapter
        if not adapter.generates:
            raise BadRequest(f"model {name!r} does not generate text (it is a {adapter.adapter_name} model)")
        named = (
            "temperature",
            "top_p",
            "top_k",
            "stop",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        )  # the last as vLLM takes it (extra_body in the openai package)
        values = {k: body[k] for k in named if body.get(k) is not None}
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None:
            values["max_new_tokens"] = max_tokens
        # errors name the fields as this caller sent them
        names = {"max_new_tokens": "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                 "logprobs": "top_logprobs" if kind == "chat" else "logprobs"}  # fmt: skip
        asked = _logprobs_asked(body, kind)
        if asked is not None:
            values["logprobs"] = asked
        params = adapter.sampling(values, names)
        n_choices = _choices(body)
        ids = adapter.check_prompt(_prompt(adapter, body, kind), params, names)
        gen = Generation(pipeline, loaded, ids, params, n_choices)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())  # a timestamp for the client, as OpenAI's
        stream = bool(body.get("stream"))
        done = gen.cached(kind, stream)
        if done is not None:
            return _reply(rid, kind, name, created, [done], len(gen.ids))
        if not stream:
            dones = gen.wait()
            lps = None if asked is None else [logprobs.shaped(adapter, kind, s.output, s.logprobs) for s in gen.seqs]
            return _reply(rid, kind, name, created, dones, len(gen.ids), lps)
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        gen.start()  # queued now, so that a full queue is a 429 before the 200 goes out

        def choice_events(i: int):
            """One choice's chunks (all choices run at once; their chunks are sent one choice after
            another, each with its index)."""
            seq = gen.seqs[i]
            if kind == "chat":
                yield _chunk(rid, kind, name, created, None, None, first=True, index=i)
            n, offset = 0, 0  # tokens streamed so far, and their text's length
            for batch in gen.batches(i):
                chunks = []  # every token that arrived while the last write went out, in one write
                for token, delta in batch:
                    lp = None
                    if asked is not None and token is not None:
                        lp = logprobs.shaped(adapter, kind, [token], seq.logprobs[n : n + 1], offset)
                    n += token is not None
                    offset += len(delta)
                    if delta or lp is not None:
                        chunks.append(_chunk(rid, kind, name, created, delta, None, logprobs=lp, index=i))
                if chunks:
                    yield "".join(chunks)
            yield _chunk(rid, kind, name, created, None, seq.finish_reason, index=i)

        def events():
            try:
                for i in range(n_choices):
                    yield from choice_events(i)
                if include_usage:
                    n = sum(len(s.output) for s in gen.seqs)
                    usage = {"prompt_tokens": len(gen.ids), "completion_tokens": n, "total_tokens": len(gen.ids) + n}
                    final = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                             "created": created, "model": name, "choices": [], "usage": usage}  # fmt: skip
                    yield "data: " + json.dumps(final) + "\n\n"
                yield "data: [DONE]\n\n"
            except ServingError as err:  # after the 200 went out: the error travels in the stream
                yield "data: " + json.dumps(error_body(failure_of(err))) + "\n\n"

        headers = {**SSE_HEADERS, "X-Model": name}
        return Response(events(), mimetype="text/event-stream", headers=headers)

    @bp.post("/completions")
    @inference_view("openai")
    def completions():
        return generate("completions")

    @bp.post("/chat/completions")
    @inference_view("openai")
    def chat_completions():
        return generate("chat")

    return bp
