"""Metrics by registered name: how an optimizer job scores a program's output against an example.

A metric is ``metric(example, prediction, trace=None) -> float`` in [0, 1], the
signature DSPy's optimizers call. The built-in metrics compare every *labelled*
output field of the example (its non-input keys) with the prediction's field of
the same name and average the per-field scores:

* ``exact_match``: equal after normalization (case-folded, punctuation dropped,
  whitespace collapsed; non-string values compared as JSON);
* ``f1``: token F1 of the normalized texts (SQuAD-style, bag of words);
* ``contains``: the normalized label occurs in the normalized output.

``dspy:<name>`` names one of DSPy's own metrics (``dspy:answer_exact_match``,
``dspy:answer_passage_match``, when the installed DSPy has them); they read the
``answer`` field. Jobs name metrics, never code: nothing is imported by name
beyond this whitelist.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import dspy

from dspex.streams.errors import InvalidRequest

Metric = Callable[..., float]
"""``metric(example, prediction, trace=None) -> float``."""

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_DSPY_METRICS = ("answer_exact_match", "answer_passage_match")


def normalize(value: Any) -> str:
    """Text for comparison: JSON for non-strings, case-folded, no punctuation, single spaces."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return " ".join(_PUNCTUATION.sub(" ", text.casefold()).split())


def exact_match_score(predicted: Any, gold: Any) -> float:
    """1.0 when the normalized texts are equal, else 0.0."""
    return float(normalize(predicted) == normalize(gold))


def f1_score(predicted: Any, gold: Any) -> float:
    """Token F1 between the normalized texts (1.0 when both are empty)."""
    pred_tokens, gold_tokens = normalize(predicted).split(), normalize(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def contains_score(predicted: Any, gold: Any) -> float:
    """1.0 when the normalized label occurs in the normalized output."""
    return float(normalize(gold) in normalize(predicted))


def labelled_fields(example: Any) -> dict[str, Any]:
    """The example's labels: every non-input field (``dspy.Example.labels()`` or a mapping)."""
    if isinstance(example, dspy.Example):
        return dict(example.labels().items())
    if isinstance(example, Mapping):
        return dict(example)
    raise TypeError(f"cannot read labels from {type(example).__name__}")


def field_metric(score: Callable[[Any, Any], float], name: str) -> Metric:
    """A metric averaging ``score(predicted, gold)`` over the example's labelled fields."""

    def metric(example: Any, prediction: Any, trace: Any = None) -> float:
        labels = labelled_fields(example)
        if not labels:
            return 0.0
        total = sum(score(_field(prediction, key), gold) for key, gold in labels.items())
        return total / len(labels)

    metric.__name__ = name
    return metric


def _field(prediction: Any, key: str) -> Any:
    if isinstance(prediction, Mapping):
        return prediction.get(key, "")
    getter = getattr(prediction, "get", None)
    return getter(key, "") if callable(getter) else getattr(prediction, key, "")


def _dspy_metric(name: str) -> Metric | None:
    found = getattr(dspy.evaluate, name, None)
    if not callable(found):
        return None

    def metric(example: Any, prediction: Any, trace: Any = None) -> float:
        return float(found(example, prediction, trace))

    metric.__name__ = f"dspy:{name}"
    return metric


def _registry() -> dict[str, Metric]:
    metrics: dict[str, Metric] = {
        "exact_match": field_metric(exact_match_score, "exact_match"),
        "f1": field_metric(f1_score, "f1"),
        "contains": field_metric(contains_score, "contains"),
    }
    for name in _DSPY_METRICS:
        metric = _dspy_metric(name)
        if metric is not None:
            metrics[f"dspy:{name}"] = metric
    return metrics


METRICS: dict[str, Metric] = _registry()


def metric_names() -> list[str]:
    """Every registered metric name, sorted."""
    return sorted(METRICS)


def get_metric(name: str) -> Metric:
    """The metric registered as ``name``; else ``InvalidRequest`` naming the registered ones."""
    try:
        return METRICS[name]
    except KeyError:
        known = ", ".join(metric_names())
        raise InvalidRequest("metric", f"unknown metric {name!r} (registered: {known})") from None
