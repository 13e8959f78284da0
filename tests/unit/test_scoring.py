"""Metrics by registered name: exact match, token F1, contains, DSPy's; unknown names refused."""

from __future__ import annotations

import dspy
import pytest

from dspex.agents.runtime.scoring import (
    contains_score,
    exact_match_score,
    f1_score,
    get_metric,
    metric_names,
    normalize,
)
from dspex.streams.errors import InvalidRequest


def example(**fields: object) -> dspy.Example:
    return dspy.Example(question="q?", **fields).with_inputs("question")


def test_normalize_folds_case_punctuation_and_spaces() -> None:
    assert normalize("  The  Eiffel-Tower! ") == "the eiffel tower"
    assert normalize(3) == "3"
    assert normalize(["a", "b"]) == "a b"


def test_field_scores() -> None:
    assert exact_match_score("Paris.", "paris") == 1.0
    assert exact_match_score("Paris, France", "Paris") == 0.0
    assert f1_score("the capital is Paris", "Paris") == pytest.approx(2 * 0.25 / 1.25)
    assert f1_score("", "") == 1.0
    assert f1_score("Lyon", "Paris") == 0.0
    assert contains_score("It is Paris, of course", "paris") == 1.0
    assert contains_score("Lyon", "Paris") == 0.0


def test_metrics_average_the_labelled_fields_only() -> None:
    exact = get_metric("exact_match")
    gold = example(answer="Paris", city="Paris")
    assert exact(gold, dspy.Prediction(answer="paris", city="Lyon")) == 0.5
    assert exact(gold, dspy.Prediction(answer="Paris", city="Paris")) == 1.0
    assert exact(gold, {"answer": "Paris"}) == 0.5  # a missing field scores 0
    assert exact(example(), dspy.Prediction(answer="x")) == 0.0  # nothing labelled


def test_f1_and_contains_by_name() -> None:
    gold = example(answer="the blue whale")
    assert get_metric("f1")(gold, dspy.Prediction(answer="blue whale")) == pytest.approx(0.8)
    assert get_metric("contains")(gold, dspy.Prediction(answer="it is the blue whale")) == 1.0


def test_dspy_metrics_are_registered_by_prefix() -> None:
    assert "dspy:answer_exact_match" in metric_names()
    metric = get_metric("dspy:answer_exact_match")
    assert metric(example(answer="Paris"), dspy.Prediction(answer="paris")) == 1.0
    assert metric(example(answer="Paris"), dspy.Prediction(answer="Lyon")) == 0.0


@pytest.mark.parametrize("name", ["accuracy", "dspy:SemanticF1", "dspy:os.system", ""])
def test_unknown_metric_is_refused_naming_the_registered_ones(name: str) -> None:
    with pytest.raises(InvalidRequest, match=r"registered: .*exact_match") as caught:
        get_metric(name)
    assert caught.value.field == "metric"
