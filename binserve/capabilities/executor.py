"""One batch of the capability server: each capability runs once, over only the texts that need it.

design: the request batcher (binserve/scheduling/batcher.py) forms the batches - requests arriving
within `batch_timeout` and up to `batch_size` texts - and calls `CapabilityExecutor` on its thread
with one sample per text: (text, the capabilities its request asked). Classification runs first,
once, over every text that needs it or whose other capabilities read it (recommendations use the
top topics, alert rules the scores): two forwards of the LLM for all texts and topics
(models/lm_scoring.py), or one batch of an encoder classifier. Recommendations then run once: every
text's prompt submitted together to the LLM's continuous batcher, greedy, and waited for. Alerts
run once: the rules over the scores, and the judge's yes/no question scored like a classification.
Each execution is counted (capability, texts), so /stats shows what batching saved. The executor
imports no Flask; the models come from the manager at each batch, so a reload is followed.
"""

from __future__ import annotations

import time

import numpy as np

from binserve.capabilities.config import CapabilityConfig, Sample
from binserve.errors import BadRequest
from binserve.observability import metrics
from binserve.scheduling.sequences import SamplingParams

#: how long a batch's recommendations may take at most (each request's own deadline is the batcher's)
GENERATION_TIMEOUT_S = 600.0


class CapabilityExecutor:
    """The batch function of the capability batcher (see the module's design)."""

    def __init__(self, config: CapabilityConfig, manager, max_length: int) -> None:
        self.config, self.manager, self.max_length = config, manager, max_length

    def __call__(self, samples: list[Sample]) -> list[dict]:
        results = [{"text": s.text} for s in samples]
        cfg = self.config
        wants = {cap: [i for i, s in enumerate(samples) if cap in s.capabilities]
                 for cap in ("classification", "recommendations", "alerts")}  # fmt: skip
        scored = sorted(set(wants["classification"]) | set(wants["recommendations"])
                        | (set(wants["alerts"]) if cfg.rules else set()))  # fmt: skip
        scores = {}
        if scored:
            probs = self._execute("classification", [samples[i].text for i in scored], self.classify)
            scores = dict(zip(scored, probs, strict=True))
            for i in wants["classification"]:
                results[i]["classification"] = {"topics": _ranked(cfg.topic_names, scores[i])}
        if wants["recommendations"]:
            idx = wants["recommendations"]
            tops = [[n for n, _ in _ranked_pairs(cfg.topic_names, scores[i])[: cfg.top_topics]] for i in idx]
            texts = self._execute("recommendations", [samples[i].text for i in idx],
                                  lambda ts: self.recommend(ts, tops))  # fmt: skip
            for i, t, top in zip(idx, texts, tops, strict=True):
                results[i]["recommendations"] = {"text": t, "topics": top}
        if wants["alerts"]:
            idx = wants["alerts"]
            found = self._execute("alerts", [samples[i].text for i in idx],
                                  lambda ts: self.alerts(ts, [scores.get(i) for i in idx]))  # fmt: skip
            for i, alerts in zip(idx, found, strict=True):
                results[i]["alerts"] = alerts
        return results

    def _execute(self, capability: str, texts: list[str], fn):
        metrics.CAPABILITY_EXECUTIONS.labels(capability).inc()
        metrics.CAPABILITY_TEXTS.labels(capability).inc(len(texts))
        return fn(texts)

    # --- the capabilities ---------------------------------------------------------------------------
    def _lm(self):
        loaded = self.manager.get(self.config.served_model)
        if not loaded.adapter.generates:
            raise BadRequest(f"config 'model' {self.config.model!r} is not a causal LM (it is a "
                             f"{loaded.adapter.adapter_name} model)")  # fmt: skip
        return loaded

    def _cut(self, adapter, text: str) -> str:
        """The text cut to `max_length` tokens (the document's --max-length)."""
        ids = adapter.tokenizer(text, add_special_tokens=False).input_ids
        return text if len(ids) <= self.max_length else adapter.tokenizer.decode(ids[: self.max_length])

    def classify(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's topic probabilities, in the config's topic order."""
        cfg = self.config
        if cfg.classify_model is not None:
            return self._classify_with_encoder(texts)
        adapter = self._lm().adapter
        topics = cfg.topics_text()
        prefixes = [adapter.tokenizer(cfg.classify_prompt.format(text=self._cut(adapter, t), topics=topics)).input_ids
                    for t in texts]  # fmt: skip
        labels = [adapter.tokenizer(" " + name, add_special_tokens=False).input_ids for name in cfg.topic_names]
        return list(_softmax(adapter.continuation_logprobs(prefixes, labels)))

    def _classify_with_encoder(self, texts: list[str]) -> list[np.ndarray]:
        loaded = self.manager.get(self.config.classify_model)
        validated = loaded.adapter.validate({"texts": list(texts)})
        result = loaded.scheduler.submit(validated.samples, time.monotonic() + GENERATION_TIMEOUT_S).result()
        reply = loaded.adapter.join(result.outputs, True, validated.options)
        if "probabilities" not in reply:
            raise BadRequest(f"classification model {self.config.classify_model!r} is not a classifier")
        probs = np.asarray(reply["probabilities"], dtype=np.float64)
        if probs.shape[1] != len(self.config.topics):
            raise BadRequest(f"classification model {self.config.classify_model!r} has {probs.shape[1]} labels; "
                             f"the config has {len(self.config.topics)} topics")  # fmt: skip
        return list(probs)

    def recommend(self, texts: list[str], tops: list[list[str]]) -> list[str]:
        """Every text's recommendation, generated together on the LLM's continuous batcher."""
        loaded = self._lm()
        adapter, cfg = loaded.adapter, self.config
        params = SamplingParams(cfg.recommend_max_tokens, 0.0)
        prompts = [
            adapter.text_prompt(cfg.recommend_prompt.format(text=self._cut(adapter, t), top_topics=", ".join(top)))
            for t, top in zip(texts, tops, strict=True)
        ]
        future = loaded.scheduler.submit([(p, params) for p in prompts], time.monotonic() + GENERATION_TIMEOUT_S)
        outputs = future.result(timeout=GENERATION_TIMEOUT_S + 5).outputs
        return [adapter.tokenizer.decode(o["output_ids"], skip_special_tokens=True).strip() for o in outputs]

    def alerts(self, texts: list[str], scores: list) -> list[list[dict]]:
        """Each text's alerts: the rules its scores meet, then the judge's verdict when it says yes."""
        cfg = self.config
        found: list[list[dict]] = [[] for _ in texts]
        names = cfg.topic_names
        for k, probs in enumerate(scores):
            for rule in cfg.rules:
                score = float(probs[names.index(rule.topic)])
                if score >= rule.threshold:
                    found[k].append({"type": "rule", "topic": rule.topic, "score": score,
                                     "message": rule.message.format(topic=rule.topic, score=score)})  # fmt: skip
        if cfg.judge_question is not None:
            adapter = self._lm().adapter
            prefixes = [adapter.tokenizer(cfg.judge_prompt.format(text=self._cut(adapter, t),
                                                                  question=cfg.judge_question)).input_ids
                        for t in texts]  # fmt: skip
            answers = [adapter.tokenizer(w, add_special_tokens=False).input_ids for w in (" yes", " no")]
            verdict = _softmax(adapter.continuation_logprobs(prefixes, answers))
            for k, (yes, _) in enumerate(verdict):
                if yes > 0.5:
                    found[k].append({"type": "judge", "question": cfg.judge_question, "score": float(yes),
                                     "message": cfg.judge_message})  # fmt: skip
        return found


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _ranked_pairs(names: list[str], probs) -> list[tuple[str, float]]:
    order = np.argsort(-np.asarray(probs), kind="stable")
    return [(names[i], float(probs[i])) for i in order]


def _ranked(names: list[str], probs) -> list[dict]:
    return [{"name": n, "score": s} for n, s in _ranked_pairs(names, probs)]
