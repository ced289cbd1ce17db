"""JSON outputs are strict JSON: no NaN or Infinity, whatever the metrics hold."""

import json
import math

import numpy as np
import pytest
import torch

from llm.io import finite_or_none, sanitize, write_json


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (float("nan"), None),
        (float("inf"), None),
        (-math.inf, None),
        (1.5, 1.5),
        (3, 3),
        ("NaN", "NaN"),
        (None, None),
        (True, True),
        (np.float32("nan"), None),
        (np.float64(0.25), 0.25),
        (np.int64(7), 7),
        (torch.tensor(float("inf")), None),
        (torch.tensor(2.5), 2.5),
    ],
)
def test_finite_or_none(value, expected):
    out = finite_or_none(value)
    assert out == expected and type(out) is type(expected)


def test_sanitize_reaches_nested_dicts_lists_and_tuples():
    obj = {"a": math.nan, "b": {"c": [1.0, math.inf, (np.float32(-np.inf), 2)]}, "d": "text"}
    assert sanitize(obj) == {"a": None, "b": {"c": [1.0, None, [None, 2]]}, "d": "text"}


def test_write_json_writes_null_for_non_finite_floats(tmp_path):
    metrics = {
        "test_response_loss": math.nan,
        "test_response_perplexity": math.inf,
        "curve": [1.0, -math.inf],
        "nested": {"judge_score": np.float64("nan"), "steps": np.int64(3)},
    }
    text = write_json(tmp_path / "m.json", metrics).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _strict(text) == {
        "test_response_loss": None,
        "test_response_perplexity": None,
        "curve": [1.0, None],
        "nested": {"judge_score": None, "steps": 3},
    }
    assert metrics["test_response_loss"] != metrics["test_response_loss"]  # the caller's object is not changed
