"""Entity-level F1 on BIO tags (cpkernels.train.metrics.entity_spans / entity_f1), on hand-made cases.

The expected values are worked out by hand below; seqeval's default mode gives the same numbers (checked
when the metric was written, not a test dependency). The GLUE metrics are tested in test_train.py.
"""
from __future__ import annotations

import pytest

from cpkernels.train.metrics import entity_f1, entity_spans


@pytest.mark.parametrize("tags, spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),  # the last entity closes at the end
    (["O", "I-PER", "I-PER"], [("PER", 1, 3)]),          # I- after O starts an entity (non-strict)
    (["I-PER", "O"], [("PER", 0, 1)]),                   # ... and so does I- at the start
    (["B-PER", "B-PER"], [("PER", 0, 1), ("PER", 1, 2)]),  # adjacent entities of one type stay two
    (["B-PER", "I-PER", "B-PER", "I-PER"], [("PER", 0, 2), ("PER", 2, 4)]),
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),  # I- of another type starts a new one
    (["I-PER", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 2)]),
    (["B-geo-loc", "I-geo-loc"], [("geo-loc", 0, 2)]),   # types may contain '-' (WNUT-16's geo-loc)
    (["O", "O"], []),
    ([], []),
])
def test_entity_spans(tags, spans):
    assert entity_spans(tags) == spans


@pytest.mark.parametrize("bad", ["PER", "B-", "E-PER", "S-PER", "o"])
def test_entity_spans_refuses_other_schemes(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        entity_spans(["O", bad])


def test_entity_f1_hand_made():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    # PER ends one token early (a boundary miss counts as wrong), LOC right, ORG tagged as LOC (wrong type),
    # and one extra entity.
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "B-MISC"]]
    scores = entity_f1(pred, true)
    assert scores["precision"] == pytest.approx(1 / 4) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    assert entity_f1(true, true) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_entity_f1_non_strict_and_adjacent():
    # The prediction forgets the B- of the first entity: same span and type, so it counts (non-strict).
    # It merges two adjacent PER entities into one: neither true entity is matched.
    true = [["B-PER", "I-PER", "O", "B-PER", "B-PER"]]
    pred = [["I-PER", "I-PER", "O", "B-PER", "I-PER"]]
    assert entity_f1(pred, true) == {"precision": 1 / 2, "recall": 1 / 3, "f1": pytest.approx(0.4)}


def test_entity_f1_empty_predictions_and_no_entities():
    true = [["B-PER", "O"], ["O"]]
    assert entity_f1([["O", "O"], ["O"]], true) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert entity_f1([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # 0/0 -> 0, as seqeval
    assert entity_f1([["B-PER", "O"], ["O"]], [["O", "O"], ["O"]])["precision"] == 0.0


def test_entity_f1_does_not_join_sequences():
    # An I- at the start of a sentence begins a new entity: it does not continue the previous sentence's.
    assert entity_f1([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]])["f1"] == 1.0


def test_entity_f1_checks_lengths():
    with pytest.raises(ValueError, match="same number of sequences"):
        entity_f1([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="sequence 1: 1 predicted tags for 2 tokens"):
        entity_f1([["O"], ["O"]], [["O"], ["O", "O"]])
