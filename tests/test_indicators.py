"""Overoptimization indicators on hand-built numbers (entry 0 of every series is the base model)."""

import pytest

from rewardtune.indicators import (
    DEFINITIONS,
    best_proxy_index,
    change_from_base,
    change_per_gain,
    first_below_base,
    first_unseen_below_base,
    gold_at_best_proxy,
    summarize,
)

TRAIN = [1.0, 2.0, 4.0, 3.0]  # the proxy peaks at checkpoint 2
GOOD = [0.5, 0.75, 1.0, 1.25]  # improves with training
BAD = [0.5, 0.5, 0.25, 0.0]  # first below base at checkpoint 2


def test_change_from_base():
    assert change_from_base(TRAIN) == [0.0, 1.0, 3.0, 2.0]
    with pytest.raises(ValueError):
        change_from_base([])


def test_change_per_gain():
    assert change_per_gain(GOOD, TRAIN) == [None, 0.25, 0.5 / 3, 0.375]
    assert change_per_gain(BAD, TRAIN) == [None, 0.0, -0.25 / 3, -0.25]
    with pytest.raises(ValueError):
        change_per_gain(GOOD[:2], TRAIN)


def test_first_below_base():
    assert first_below_base(BAD) == 2
    assert first_below_base(GOOD) is None
    assert first_below_base([1.0, 0.95, 0.5], tolerance=0.1) == 2


def test_first_unseen_below_base_takes_earliest_and_breaks_ties_by_name():
    assert first_unseen_below_base({"good": GOOD, "bad": BAD}) == (2, "bad")
    assert first_unseen_below_base({"z": [1.0, 0.0], "a": [1.0, 0.0]}) == (1, "a")
    assert first_unseen_below_base({"good": GOOD}) is None


def test_gold_at_best_proxy():
    assert best_proxy_index(TRAIN) == 2
    assert best_proxy_index([1.0, 1.0]) == 0  # ties go to the earliest
    assert gold_at_best_proxy(TRAIN, BAD) == (2, 0.25, -0.25)
    assert gold_at_best_proxy(TRAIN, GOOD) == (2, 1.0, 0.5)


def test_summarize_names_checkpoints():
    names = ["base", "epoch-000001", "epoch-000002", "epoch-000003"]
    out = summarize(names, "proxy", {"proxy": TRAIN, "good": GOOD, "bad": BAD}, ["good", "bad"])
    assert out["train_gain_final"] == 2.0
    assert out["best_proxy_checkpoint"] == "epoch-000002"
    assert out["first_unseen_below_base"] == {"checkpoint": "epoch-000002", "reward": "bad"}
    assert out["unseen"]["bad"]["change_final"] == -0.5
    assert out["unseen"]["bad"]["change_per_gain_final"] == -0.25
    assert out["unseen"]["good"]["gold_at_best_proxy"] == 1.0
    assert out["unseen"]["good"]["first_below_base"] is None


def test_every_indicator_has_a_definition():
    assert all(text.strip() for text in DEFINITIONS.values())
