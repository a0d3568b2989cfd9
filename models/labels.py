"""Classifier replies in labels (top-k names and scores, or every label over a threshold), and the
accuracy gate that embedding and classifier adapters share.

design: pure numpy on one request's probabilities, on its request thread after the batch ran
(the options are per request; the batch computed the same probabilities for everyone). A
single-label model's scores are softmax probabilities and the default is its top label; a
multi-label model's (sigmoid, from `problem_type: multi_label_classification`) default is every
label scoring at least 0.5, as multi-label classifiers are usually read.
"""

from __future__ import annotations

import numpy as np

from binserve.errors import InvalidInput

#: request keys a classifier takes besides its inputs
OPTION_KEYS = ("top_k", "threshold")
MULTI_LABEL_THRESHOLD = 0.5


def parse_options(payload: dict, num_labels: int) -> dict:
    """`top_k` (1..num_labels) and `threshold` (0..1) from a request, checked; 400 naming a bad one."""
    options = {}
    top_k = payload.get("top_k")
    if top_k is not None:
        if type(top_k) is not int or not 1 <= top_k <= num_labels:
            raise InvalidInput(f"'top_k' must be an int in [1, {num_labels}] (this model's labels), got {top_k!r}")
        options["top_k"] = top_k
    threshold = payload.get("threshold")
    if threshold is not None:
        if type(threshold) not in (int, float) or not 0.0 <= threshold <= 1.0:
            raise InvalidInput(f"'threshold' must be a number in [0, 1], got {threshold!r}")
        options["threshold"] = float(threshold)
    return options


def label_rows(probabilities: np.ndarray, labels: list[str], multi_label: bool, options: dict) -> tuple[list, list]:
    """Per row of `probabilities` (N, L): the chosen label names and their scores, best first."""
    top_k = options.get("top_k")
    threshold = options.get("threshold")
    if top_k is None and threshold is None:
        if multi_label:
            threshold = MULTI_LABEL_THRESHOLD
        else:
            top_k = 1
    names, scores = [], []
    for row in np.asarray(probabilities, dtype=np.float64):
        order = np.argsort(-row, kind="stable")
        if threshold is not None:
            order = order[row[order] >= threshold]
        if top_k is not None:
            order = order[:top_k]
        names.append([labels[i] for i in order])
        scores.append([float(row[i]) for i in order])
    return names, scores


def with_labels(reply: dict, batched: bool, labels: list[str], multi_label: bool, options: dict) -> dict:
    """A classifier's joined reply with `labels` and `scores` added from its `probabilities`."""
    probs = reply["probabilities"] if batched else reply["probabilities"][None]
    names, scores = label_rows(probs, labels, multi_label, options or {})
    reply["labels"], reply["scores"] = (names, scores) if batched else (names[0], scores[0])
    return reply


def gate(task: str, reference: dict[str, np.ndarray], got: dict[str, np.ndarray], runtime) -> tuple[bool, str]:
    """The accuracy gate of an embedding model (smallest cosine to fp32) or a classifier (the same
    argmax, and probabilities within `max_prob_error`); `runtime` holds the thresholds."""
    if task == "embedding":
        a, b = reference["embeddings"].astype(np.float64), got["embeddings"].astype(np.float64)
        cos = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
        return cos >= runtime.min_cosine, f"min cosine {cos:.6f} (gate {runtime.min_cosine})"
    same = bool((reference["probabilities"].argmax(1) == got["probabilities"].argmax(1)).all())
    err = float(np.abs(reference["probabilities"] - got["probabilities"]).max())
    return same and err <= runtime.max_prob_error, f"argmax {'equal' if same else 'differs'}, max prob error {err:.5f}"
