"""Scoring continuations with a causal LM: log P(continuation | prefix) for every prefix x every
continuation, the prefix computed once.

design: zero-shot classification asks, for T texts and K labels, T x K log-likelihoods. One
forward runs the T prefixes (left-padded, so every prefix ends at the same column, with position
ids counted over the real tokens); its KV cache is then repeated K times per row and one more
forward runs the K continuations (right-padded) after every prefix. So a prefix is computed once,
not K times, and everything is two forwards, whatever T and K. A continuation's first token is
scored by the prefix forward's last logits, its later tokens by the second forward's. Padding is
masked everywhere, so a row's score is its unpadded one up to float rounding (the tests compare it
with one unpadded forward per prefix and continuation).
"""

from __future__ import annotations

import numpy as np
import torch


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module, prefixes: list[list[int]], continuations: list[list[int]], pad_id: int = 0
) -> np.ndarray:
    """(T, K) float64: log P(continuations[k] | prefixes[t]), summed over the continuation's tokens."""
    if not prefixes or not continuations or any(not p for p in prefixes) or any(not c for c in continuations):
        raise ValueError("every prefix and every continuation needs at least one token")
    device = next(model.parameters()).device
    t, k = len(prefixes), len(continuations)
    width = max(len(p) for p in prefixes)
    ids = torch.full((t, width), pad_id, dtype=torch.long)
    mask = torch.zeros((t, width), dtype=torch.long)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True)  # fmt: skip
    first = out.logits[:, -1].float().log_softmax(-1)  # (T, V): the next token after each prefix
    scores = first[:, torch.tensor([c[0] for c in continuations], device=device)].double()  # (T, K)
    rest = max(len(c) for c in continuations) - 1
    if rest:
        cache = out.past_key_values
        cache.batch_repeat_interleave(k)  # row t*K + j: prefix t, continuation j
        inputs = torch.full((k, rest), pad_id, dtype=torch.long)
        cont_mask = torch.zeros((k, rest), dtype=torch.long)
        targets = torch.zeros((k, rest), dtype=torch.long)
        for j, c in enumerate(continuations):
            inputs[j, : len(c) - 1] = torch.tensor(c[:-1])
            cont_mask[j, : len(c) - 1] = 1
            targets[j, : len(c) - 1] = torch.tensor(c[1:])
        lengths = mask.sum(-1)  # real prefix tokens per text
        pos = (lengths[:, None, None] + torch.arange(rest)[None, None, :]).expand(t, k, rest).reshape(t * k, rest)
        full_mask = torch.cat([mask.repeat_interleave(k, 0), cont_mask.repeat(t, 1)], dim=1)
        later = model(input_ids=inputs.repeat(t, 1).to(device), attention_mask=full_mask.to(device),
                      position_ids=pos.to(device), past_key_values=cache, use_cache=True)  # fmt: skip
        logp = later.logits.float().log_softmax(-1)  # (T*K, rest, V)
        picked = logp.gather(-1, targets.repeat(t, 1).to(device)[..., None])[..., 0]  # (T*K, rest)
        picked = picked * cont_mask.repeat(t, 1).to(device)
        scores += picked.sum(-1).double().reshape(t, k)
    return scores.cpu().numpy()


def reference_logprobs(model: torch.nn.Module, prefix: list[int], continuation: list[int]) -> float:
    """One unpadded forward of prefix + continuation: what `continuation_logprobs` must equal."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        ids = torch.tensor([prefix + continuation], device=device)
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return float(sum(logp[len(prefix) - 1 + j, tok] for j, tok in enumerate(continuation)))
