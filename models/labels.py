"""Classifier replies in labels: top-k names and scores, or every label over a threshold.

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
