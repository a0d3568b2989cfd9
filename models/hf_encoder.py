"""Adapter for a local Hugging Face encoder directory: sentence embeddings or sequence classification.

design: tokenization happens in `validate`, on the request thread, with the fast tokenizer and
without padding (~0.05 ms a text), so the batch thread only pads to the batch's own longest row and
runs the forward pass on the engine its plan picks (binserve/engines/). Embedding models give
pooled, L2-normalised embeddings through the sentence-transformers pipeline the directory declares
(models/sentence_modules.py: pooling, Dense projections; mean pooling by default); of an
encoder-decoder family (T5: sentence-T5, GTR) only the encoder is loaded (`T5EncoderModel`, or the
family's encoder), since the whole model's forward would ask for decoder inputs.
`*ForSequenceClassification` models give logits and probabilities (softmax; sigmoid for
`problem_type: multi_label_classification`), and each reply names the labels (`id2label`): top-k,
or every label over a threshold (models/labels.py). Pooling and projections are part of
`EncoderHead`, the module both torch and the ONNX export run, so every engine returns the final
outputs. Weights load through safetensors only. Models of one fan-out request that share a
tokenizer file tokenize its texts once (`validate`'s `shared`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from binary_protocol import as_array
from binserve.errors import InvalidInput, LimitExceeded
from models.base import ModelAdapter, OnnxSpec
from models.contract import TensorSpec, Validated
from models.labels import OPTION_KEYS, gate, parse_options, with_labels
from models.sentence_modules import SentencePipeline, pool, read_pipeline


def _direct_encoder(tokenizer, max_length: int | None):
    """A private copy of `tokenizer`'s Rust tokenizer that cuts at `max_length` tokens (None: never),
    special tokens included, and never pads: the ids transformers' `tokenizer(texts, truncation=...)`
    gives, without its per-call Python (and without its habit of reconfiguring the shared backend
    tokenizer on every call, which threads tokenizing with other settings would race on)."""
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.no_padding()
    if max_length is None:
        encoder.no_truncation()
    else:
        encoder.enable_truncation(max_length, direction=tokenizer.truncation_side)
    return encoder


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


# Texts the accuracy gate checks every engine on: short to long, so padding, attention over long
# rows and truncation are all exercised.
GATE_TEXTS = [
    "hi",
    "The quick brown fox jumps over the lazy dog.",
    "binserve batches concurrent requests in a background thread and answers in a binary format.",
    "What is the capital of France, and how many people live there today?",
    "Stock markets fell sharply after the central bank raised interest rates again on Tuesday.",
    "The patient was given antibiotics for the infection and recovered within a week.",
    " ".join(f"a long text of many words, number {i}, to fill the rows" for i in range(24)),
    "Ünïcödé, emoji 🙂 and numbers 3.14159 mixed in one line.",
]
# A batch's rows are padded to a multiple of this many tokens: OpenVINO prepares kernels per input
# shape, and aligned lengths make fewer shapes that run faster (MiniLM bf16, 1,500 batches of 1-32
# rows of 20-36 tokens: 8.5-11.7 s padded, 11.5-14.7 s not, with every shape's kernels cached).
PAD_MULTIPLE = 8
# Timing samples: about 25 tokens, like a typical short query or sentence.
BENCH_TEXT = "a model serves many requests quickly while the batches grow under load on every core of the cpu"


class EncoderHead(torch.nn.Module):
    """The encoder plus what follows it: (input_ids, attention_mask) -> final outputs, for torch and ONNX."""

    def __init__(
        self, model: torch.nn.Module, task: str, sentence: SentencePipeline, multi_label: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.pooling = sentence.pooling
        self.dense = sentence.dense
        self.multi_label = multi_label

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.task == "classification":
            logits = out.logits.float()
            return logits, torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        pooled = pool(out.last_hidden_state.float(), attention_mask, self.pooling)  # fp32 whatever the engine
        if self.dense is not None:
            pooled = self.dense(pooled)
        return (torch.nn.functional.normalize(pooled, p=2, dim=1),)


def _load_encoder(root: Path, config) -> torch.nn.Module:
    """The model an embedding needs: the encoder alone for an encoder-decoder family."""
    options = {"use_safetensors": True, "local_files_only": True}
    # The directory's own encoder class, else its family's (T5Model -> T5EncoderModel): a T5 saved as
    # T5EncoderModel does not say is_encoder_decoder, and AutoModel would build the whole T5Model.
    family = MODEL_MAPPING_NAMES.get(config.model_type, "")
    names = [a for a in config.architectures or [] if a.endswith("EncoderModel")]
    names.append(family.removesuffix("Model") + "EncoderModel")
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is not None:
        return cls.from_pretrained(root, **options)
    model = AutoModel.from_pretrained(root, **options)
    # another encoder-decoder family (BART, Pegasus, ...): keep the encoder, let the decoder go
    return model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model


class HFEncoder(ModelAdapter):
    """A BERT-style encoder: `{"texts": [...]}` or `{"input_ids": ...}` in, embeddings/logits out."""

    adapter_name = "hf_encoder"
    token_inputs = True
    bf16_weights_on_cpu = True  # integer inputs; measured faster than autocast for small batches

    def load(self, top: Path) -> None:
        device = self.device
        config = AutoConfig.from_pretrained(top, local_files_only=True)
        archs = config.architectures or []
        self.task = "classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "embedding"
        if self.task == "classification":
            self.sentence = SentencePipeline(top)
            model = AutoModelForSequenceClassification.from_pretrained(top, use_safetensors=True, local_files_only=True)
        else:
            self.sentence = read_pipeline(top)
            if self.sentence.encoder_dir != top:
                config = AutoConfig.from_pretrained(self.sentence.encoder_dir, local_files_only=True)
            model = _load_encoder(self.sentence.encoder_dir, config)
        root = self.sentence.encoder_dir
        self._model = model.to(device).eval()
        if self.sentence.dense is not None:
            self.sentence.dense.to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(root, use_fast=True, local_files_only=True)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{root}: a fast tokenizer (tokenizer.json) is required")
        st_config = next((c for d in (root, top) if (c := _read_json(d / "sentence_bert_config.json"))), {})
        limit = getattr(config, "max_position_embeddings", 512)
        self.max_length = int(min(st_config.get("max_seq_length", self.tokenizer.model_max_length), limit))
        if self.limits.max_text_tokens:  # the operator's cap (the encoder server's --max-sequence-length)
            self.max_length = min(self.max_length, self.limits.max_text_tokens)
        self.vocab_size = int(config.vocab_size)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.labels = [config.id2label[i] for i in range(config.num_labels)] if self.task == "classification" else None
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        # Models of one request that share a tokenizer (same file) share its tokens (see validate).
        tok_file = root / "tokenizer.json"
        self.tokenizer_key = hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.is_file() else str(root)
        # Tokenizing costs time per character whatever the truncation, so texts are cut (or refused)
        # at a length that nearly always holds more than max_length tokens (~4-5 characters each).
        self.max_text_chars = self.limits.max_text_chars or 32 * self.max_length
        self.output_names = ["embeddings"] if self.task == "embedding" else ["logits", "probabilities"]
        self._encoder = _direct_encoder(self.tokenizer, self.max_length if self.limits.truncate else None)
        self._heads: dict[int, EncoderHead] = {}

    @property
    def module(self) -> torch.nn.Module:
        return self._model

    def input_spec(self) -> dict:
        return {
            "texts": "str or list of str (tokenized on the server)",
            "input_ids": f"int token ids, 1-D (one sample) or 2-D/ragged lists (a batch); 0 <= id < {self.vocab_size}",
            "attention_mask": "optional, with input_ids: 1 for tokens to keep",
            "max_length": self.max_length,  # a request's own `max_length` (1..this) cuts its rows shorter
            "max_text_chars": self.max_text_chars,
            "truncate": self.limits.truncate,
            "outputs": ["embeddings"] if self.task == "embedding" else ["logits", "probabilities"],
            "labels": self.labels,
            "multi_label": self.multi_label if self.labels else None,
            "options": {"top_k": "labels per row, best first", "threshold": "labels scoring at least this"}
            if self.labels
            else None,
        }

    def input_tensors(self) -> list[TensorSpec]:
        # texts or token ids, not both in one request; ids rows are of any length up to max_length
        ids = np.dtype(np.int64)
        return [
            TensorSpec("texts", None, ()),
            TensorSpec("input_ids", ids, (-1,)),
            TensorSpec("attention_mask", ids, (-1,)),
        ]

    def example_payload(self) -> dict:
        return {"texts": ["binserve warms the model up with this sentence."]}

    # --- request thread --------------------------------------------------------------------
    def validate(self, payload: dict, shared: dict | None = None) -> Validated:
        extra = (set(OPTION_KEYS) if self.labels else set()) | {"max_length"}
        options = parse_options(payload, len(self.labels)) if self.labels else {}
        length = self._max_length_option(payload.get("max_length"))
        if "texts" in payload:
            _only(payload, {"texts"} | extra)
            return self._from_texts(payload["texts"], shared, options, length)
        if "input_ids" in payload:
            _only(payload, {"input_ids", "attention_mask"} | extra)
            validated = self._from_ids(payload["input_ids"], payload.get("attention_mask"))
            rows = validated.samples if length == self.max_length else [r[:length] for r in validated.samples]
            return Validated(rows, validated.batched, options)
        raise InvalidInput(
            f"expected 'texts' (str or list of str) or 'input_ids' (token ids); got keys {sorted(payload)}"
        )

    def _max_length_option(self, value) -> int:
        """A request's `max_length` (the encoder server's): tokens per row, cut to it; at most the model's."""
        if value is None:
            return self.max_length
        if type(value) is not int or not 1 <= value <= self.max_length:
            raise InvalidInput(f"'max_length' must be an int in [1, {self.max_length}] (this model's), got {value!r}")
        return value

    def _from_texts(self, texts, shared: dict | None, options: dict, length: int | None = None) -> Validated:
        batched = not isinstance(texts, str)
        texts = [texts] if not batched else texts
        if not isinstance(texts, (list, tuple)):
            raise InvalidInput("'texts' must be a str or a list of str")
        self.check_samples(len(texts), "'texts'")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidInput("'texts' must be a str or a list of str")
        if not texts:
            raise InvalidInput("'texts' is an empty list; send at least one text")
        length = length or self.max_length
        if shared is None:
            return Validated(self._tokenize(texts, length), batched, options)
        # the same texts object, the same tokenizer file and the same cutting rules: the same rows
        key = ("hf_encoder.tokens", id(texts), self.tokenizer_key, length, self.max_text_chars, self.limits)
        if key not in shared:
            shared[key] = (texts, self._tokenize(texts, length))  # holding `texts` keeps its id unique
        return Validated(shared[key][1], batched, options)

    def _tokenize(self, texts: list[str], length: int | None = None) -> list[np.ndarray]:
        """Token rows of `texts`, cut or refused as the limits say (per-text checks, not the count);
        a request's own `length` (its max_length) always cuts."""
        asked = length is not None and length < self.max_length
        truncate, limit = self.limits.truncate, self.max_text_chars
        too_long = next((i for i, t in enumerate(texts) if len(t) > limit), None)
        if too_long is not None:
            if not truncate:
                raise LimitExceeded(
                    f"text {too_long} of 'texts' has {len(texts[too_long])} characters; this model takes at most "
                    f"{limit} (max_text_chars; or start the server with truncate on)"
                )
            texts = [t[:limit] for t in texts]
        if not asked:  # the usual request: the Rust tokenizer directly (transformers' call costs ~2x)
            encodings = [self._encoder.encode(texts[0])] if len(texts) == 1 else self._encoder.encode_batch(list(texts))
            rows = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
            if not truncate:
                self._check_row_lengths(rows, "text")
            return rows
        enc = self.tokenizer(
            list(texts),
            truncation=truncate or asked,
            max_length=length if asked else (self.max_length if truncate else None),
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return [np.asarray(ids, dtype=np.int64) for ids in enc["input_ids"]]

    def _check_row_lengths(self, rows: list, what: str) -> None:
        for i, r in enumerate(rows):
            if len(r) > self.max_length:
                raise LimitExceeded(
                    f"{what} {i} has {len(r)} tokens; this model takes at most {self.max_length} "
                    "(start the server with truncate on to cut them)"
                )

    def _from_ids(self, ids, mask) -> Validated:
        rows, batched = _rows(ids, "input_ids", self.check_samples)
        if mask is not None:
            mask_rows, _ = _rows(mask, "attention_mask", self.check_samples)
            if len(mask_rows) != len(rows) or any(len(m) != len(r) for m, r in zip(mask_rows, rows, strict=True)):
                raise InvalidInput("'attention_mask' must have the same shape as 'input_ids'")
            rows = [r[m != 0] for r, m in zip(rows, mask_rows, strict=True)]
        for i, r in enumerate(rows):
            if len(r) == 0:
                raise InvalidInput(f"'input_ids' row {i} is empty")
            if r.min() < 0 or r.max() >= self.vocab_size:
                raise InvalidInput(f"'input_ids' row {i} has ids outside [0, {self.vocab_size})")
        if self.limits.truncate:
            rows = [r[: self.max_length] for r in rows]
        else:
            self._check_row_lengths(rows, "'input_ids' row")
        return Validated(rows, batched)

    # --- batch thread ------------------------------------------------------------------------
    def collate(self, samples: list) -> dict[str, np.ndarray]:
        runner = self.runner
        lengths = [len(s) for s in samples]
        shape = (len(samples), -(-max(lengths) // PAD_MULTIPLE) * PAD_MULTIPLE)
        ids = runner.staging("input_ids", shape, np.int64)
        mask = runner.staging("attention_mask", shape, np.int64)
        ids.fill(self.pad_id)
        mask.fill(0)
        for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
            ids[i, :n] = s
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def torch_forward(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        head = self._heads.get(id(module))
        if head is None:
            head = self._heads[id(module)] = EncoderHead(module, self.task, self.sentence, self.multi_label)
        return dict(zip(self.output_names, head(inputs["input_ids"], inputs["attention_mask"]), strict=True))

    def onnx_spec(self) -> OnnxSpec:
        # traced with a padded batch, so the attention-mask path is in the graph
        example = self.collate(self._tokenize(GATE_TEXTS[1:3]))
        axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
        axes.update({name: {0: "batch"} for name in self.output_names})
        return OnnxSpec(
            EncoderHead(self._model, self.task, self.sentence, self.multi_label),
            example,
            ["input_ids", "attention_mask"],
            self.output_names,
            axes,
        )

    def join(self, outputs: list[dict], batched: bool, options: dict | None = None) -> dict:
        reply = super().join(outputs, batched, options)
        return with_labels(reply, batched, self.labels, self.multi_label, options) if self.labels else reply

    def int8_excluded(self, node_name: str) -> bool:
        # Measured on MiniLM: quantizing every MatMul gives cosine 0.988 to fp32; leaving the FFN
        # output projections (the ones after GELU, with the widest activations) in fp32 gives 0.993.
        return "/output/dense" in node_name and "/attention/" not in node_name

    # internal samples: not a request, so not held to a request's limits (a server may allow 4 a request)
    def gate_samples(self) -> list:
        return self._tokenize(GATE_TEXTS)

    def bench_samples(self, n: int) -> list:
        return self._tokenize([f"{BENCH_TEXT} {i}" for i in range(n)])

    def accuracy(self, reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[bool, str]:
        return gate(self.task, reference, got, self.options.runtime)


def _only(payload: dict, allowed: set) -> None:
    extra = set(payload) - allowed
    if extra:
        raise InvalidInput(f"unexpected keys {sorted(extra)}; this model takes {sorted(allowed)}")


def _rows(value, name: str, check_samples) -> tuple[list[np.ndarray], bool]:
    """Token id input as a list of 1-D int64 rows, and whether it was a batch.

    The number of rows is checked (`check_samples`) before any per-row work.
    """
    if isinstance(value, np.ndarray):
        if value.ndim == 2:
            check_samples(value.shape[0], f"'{name}'")
        arr = as_array(value, dtype=np.int64, name=name)
        if arr.ndim == 1:
            return [arr], False
        if arr.ndim == 2:
            if arr.shape[0] == 0:
                raise InvalidInput(f"'{name}' is an empty batch")
            return list(arr), True
        raise InvalidInput(f"'{name}' must be 1-D (one sample) or 2-D (a batch), got shape {arr.shape}")
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidInput(f"'{name}' is empty")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [as_array(list(value), dtype=np.int64, name=name)], False
        if all(isinstance(v, (list, tuple, np.ndarray)) for v in value):
            check_samples(len(value), f"'{name}'")
            rows = [as_array(v, dtype=np.int64, name=f"{name}[{i}]") for i, v in enumerate(value)]
            if any(r.ndim != 1 for r in rows):
                raise InvalidInput(f"each row of '{name}' must be a flat list of ints")
            return rows, True
    raise InvalidInput(f"'{name}' must be a list of ints, a list of lists of ints, or an int array")
