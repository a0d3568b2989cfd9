"""Adapter for a local Hugging Face encoder directory: sentence embeddings or sequence classification.

design: tokenization happens in `validate`, on the request thread, with the fast tokenizer and
without padding, so the batch thread only pads to the batch's own longest row and runs the forward
pass. Embedding models (AutoModel) give pooled, L2-normalised embeddings, pooled as the directory's
sentence-transformers config says (mean by default); `*ForSequenceClassification` models give logits
and softmax probabilities. Weights load through safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from binary_protocol import as_array
from errors import InvalidInput, LimitExceeded
from models.base import AdapterOptions, ModelAdapter, Validated


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


class HFEncoder(ModelAdapter):
    """A BERT-style encoder: `{"texts": [...]}` or `{"input_ids": ...}` in, embeddings/logits out."""

    adapter_name = "hf_encoder"
    token_inputs = True

    def __init__(
        self,
        name: str,
        version: str,
        path: str,
        device: torch.device,
        options: AdapterOptions | None = None,
    ) -> None:
        super().__init__(name, version, device, options)
        root = Path(path)
        config = AutoConfig.from_pretrained(root)
        archs = config.architectures or []
        self.task = "classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "embedding"
        cls = AutoModelForSequenceClassification if self.task == "classification" else AutoModel
        self._model = cls.from_pretrained(root, use_safetensors=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(root, use_fast=True)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{root}: a fast tokenizer (tokenizer.json) is required")
        st_config = _read_json(root / "sentence_bert_config.json") or {}
        limit = getattr(config, "max_position_embeddings", 512)
        self.max_length = int(min(st_config.get("max_seq_length", self.tokenizer.model_max_length), limit))
        pooling = _read_json(root / "1_Pooling" / "config.json") or {}
        self.pooling = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        self.vocab_size = int(config.vocab_size)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.labels = [config.id2label[i] for i in range(config.num_labels)] if self.task == "classification" else None
        # Tokenizing costs time per character whatever the truncation, so texts are cut (or refused)
        # at a length that nearly always holds more than max_length tokens (~4-5 characters each).
        self.max_text_chars = self.limits.max_text_chars or 32 * self.max_length

    @property
    def module(self) -> torch.nn.Module:
        return self._model

    def input_spec(self) -> dict:
        return {
            "texts": "str or list of str (tokenized on the server)",
            "input_ids": f"int token ids, 1-D (one sample) or 2-D/ragged lists (a batch); 0 <= id < {self.vocab_size}",
            "attention_mask": "optional, with input_ids: 1 for tokens to keep",
            "max_length": self.max_length,
            "max_text_chars": self.max_text_chars,
            "truncate": self.limits.truncate,
            "outputs": ["embeddings"] if self.task == "embedding" else ["logits", "probabilities"],
            "labels": self.labels,
        }

    def example_payload(self) -> dict:
        return {"texts": ["binserve warms the model up with this sentence."]}

    # --- request thread --------------------------------------------------------------------
    def validate(self, payload: dict) -> Validated:
        if "texts" in payload:
            _only(payload, {"texts"})
            return self._from_texts(payload["texts"])
        if "input_ids" in payload:
            _only(payload, {"input_ids", "attention_mask"})
            return self._from_ids(payload["input_ids"], payload.get("attention_mask"))
        raise InvalidInput(
            f"expected 'texts' (str or list of str) or 'input_ids' (token ids); got keys {sorted(payload)}"
        )

    def _from_texts(self, texts) -> Validated:
        batched = not isinstance(texts, str)
        texts = [texts] if not batched else texts
        if not isinstance(texts, (list, tuple)):
            raise InvalidInput("'texts' must be a str or a list of str")
        self.check_samples(len(texts), "'texts'")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidInput("'texts' must be a str or a list of str")
        if not texts:
            raise InvalidInput("'texts' is an empty list; send at least one text")
        truncate, limit = self.limits.truncate, self.max_text_chars
        too_long = next((i for i, t in enumerate(texts) if len(t) > limit), None)
        if too_long is not None:
            if not truncate:
                raise LimitExceeded(
                    f"text {too_long} of 'texts' has {len(texts[too_long])} characters; this model takes at most "
                    f"{limit} (max_text_chars; or start the server with truncate on)"
                )
            texts = [t[:limit] for t in texts]
        enc = self.tokenizer(
            list(texts),
            truncation=truncate,
            max_length=self.max_length if truncate else None,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        rows = [np.asarray(ids, dtype=np.int64) for ids in enc["input_ids"]]
        if not truncate:
            self._check_row_lengths(rows, "text")
        return Validated(rows, batched)

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
    def run_batch(self, samples: list) -> list[dict]:
        runner = self.runner
        runner.next_batch()
        lengths = [len(s) for s in samples]
        shape = (len(samples), max(lengths))
        ids = runner.staging("input_ids", shape, np.int64)
        mask = runner.staging("attention_mask", shape, np.int64)
        ids.fill(self.pad_id)
        mask.fill(0)
        for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
            ids[i, :n] = s
            mask[i, :n] = 1
        inputs = runner.to_device({"input_ids": ids, "attention_mask": mask})
        outputs = runner.to_host(runner.forward(self._forward, inputs))
        return [{k: v[i] for k, v in outputs.items()} for i in range(len(samples))]

    def _forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self._model(**inputs)
        if self.task == "classification":
            logits = out.logits.float()
            return {"logits": logits, "probabilities": torch.softmax(logits, dim=-1)}
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return {"embeddings": torch.nn.functional.normalize(pooled.float(), p=2, dim=1)}


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
