"""Log-probabilities in OpenAI's shapes: the legacy completions object (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`) and chat's `content` list (`token`, `logprob`,
`bytes`, `top_logprobs`), for a whole reply or for the tokens of one streamed chunk.

design: the batcher records, per generated token, its log-probability and its alternatives'
(`Sequence.logprobs`, log-softmax of the model's logits for that step, as vLLM reports them by
default); this module only names the tokens (the adapter's `token_texts`) and shapes them.
"""

from __future__ import annotations


def completion(adapter, ids: list[int], entries: list, offset: int = 0) -> dict:
    """The legacy completions `logprobs` of tokens `ids`; `offset`: where their text starts."""
    texts = adapter.token_texts(ids)
    offsets, at = [], offset
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": texts,
        "token_logprobs": [lp for lp, _ in entries],
        "top_logprobs": [
            dict(zip(adapter.token_texts([a for a, _ in top]), [lp for _, lp in top], strict=True))
            for _, top in entries
        ],  # fmt: skip
        "text_offset": offsets,
    }


def chat(adapter, ids: list[int], entries: list) -> dict:
    """Chat's `logprobs` of tokens `ids`."""
    content = []
    for text, (lp, top) in zip(adapter.token_texts(ids), entries, strict=True):
        alternatives = adapter.token_texts([a for a, _ in top])
        content.append({
            "token": text, "logprob": lp, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode("utf-8"))}
                             for a, (_, alp) in zip(alternatives, top, strict=True)],
        })  # fmt: skip
    return {"content": content, "refusal": None}


def shaped(adapter, kind: str, ids: list[int], entries: list, offset: int = 0) -> dict:
    """The `logprobs` of a choice (or of one chunk) for `kind` (completions or chat)."""
    return chat(adapter, ids, entries) if kind == "chat" else completion(adapter, ids, entries, offset)
