"""A tiny random-weight Llama with a real tokenizer and chat template, for tests and benchmarks.

The weights are random (seeded), so the text is nonsense; what generation does with them -
shapes, caches, batching, sampling, stopping - is real. The tokenizer is a byte-level BPE trained
here on a few sentences (no download), saved with a chat template, as a local Hugging Face causal
LM directory is. `python -m models.examples.causal_lm DIR [layers] [hidden]` writes one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "binserve batches concurrent requests and answers them in order.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "A language model writes one token at a time, and the server keeps many sequences running.",
    "Hello! How are you today? I am fine, thank you, and you?",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ' \" ( ) [ ] { }",
]


#: prompts of different lengths, for the tests (the benchmark makes its own)
EXAMPLE_PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog while",
    "binserve batches",
    "A language model writes one token at a time, and the server keeps many",
    "numbers 0 1 2 3",
    "How are you today?",
    "Hello! How are you",
    "The cat",
]


def greedy_reference(model, ids: list[int], n: int, eos: bool = True) -> list[int]:
    """What `model.generate` gives alone, greedy, for prompt `ids`: the n new token ids (fewer at EOS
    unless `eos` is False)."""
    t = torch.tensor([ids], device=model.device)
    kwargs = {} if eos else {"eos_token_id": None}
    with torch.no_grad():
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, len(ids) :].tolist()


def write_causal_lm(
    out: Path,
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    vocab: int = 512,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
) -> Path:
    """Write a model directory (config, safetensors weights, tokenizer with a chat template) to `out`.

    `heads`/`kv_heads` (grouped-query attention) and `intermediate` (the MLP's width; default 2 x
    hidden) shape larger models: 24 x 1280 with 10/2 heads and 5120 is a ~0.5B Llama."""
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    special = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=vocab, min_frequency=1, special_tokens=special)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    hidden = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    write_causal_lm(Path(sys.argv[1]), layers, hidden)
