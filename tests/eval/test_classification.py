"""TOP1/TOP5, per-class accuracy, confusions and predictions, against brute-force computations."""

import json

import numpy as np
import pyarrow as pa
import pytest

from vtplatform import schema as S
from vtplatform.eval import classification as C
from vtplatform.predict import format_predictions


def _case(n=300, classes=12, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, classes)) * 2
    labels = rng.integers(0, classes, n)
    logits[np.arange(n), labels] += rng.uniform(0, 3, n)  # better than chance, far from perfect
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


def _brute_topk_hits(probs, labels, k):
    """The seed's compute_topk_correct_hits, written out."""
    hits = 0
    for p, y in zip(probs, labels, strict=True):
        order = sorted(range(len(p)), key=lambda c: -p[c])
        hits += int(y in order[:k])
    return hits / len(labels)


def test_top1_top5_loss_and_per_class_against_brute_force():
    probs, labels = _case()
    ids, _ = C.topk(probs, 5)
    report = C.evaluate(ids, labels, 12, label_probs=probs[np.arange(len(labels)), labels])
    assert report["TOP1_ACC"] == pytest.approx(_brute_topk_hits(probs, labels, 1))
    assert report["TOP5_ACC"] == pytest.approx(_brute_topk_hits(probs, labels, 5))
    assert 0.2 < report["TOP1_ACC"] < report["TOP5_ACC"] < 1.0
    assert report["loss"] == pytest.approx(float(np.mean([-np.log(p[y]) for p, y in zip(probs, labels, strict=True)])))
    pred = probs.argmax(axis=1)
    for row in report["per_class"]:
        mask = labels == row["class_id"]
        assert row["support"] == mask.sum()
        assert row["accuracy"] == pytest.approx(float((pred[mask] == row["class_id"]).mean()))
    assert report["mean_class_accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in report["per_class"]]))


def test_confusion_pairs_match_a_confusion_matrix():
    probs, labels = _case(seed=3)
    ids, _ = C.topk(probs, 5)
    report = C.evaluate(ids, labels, 12)
    matrix = np.zeros((12, 12), int)
    np.add.at(matrix, (labels, probs.argmax(axis=1)), 1)
    np.fill_diagonal(matrix, 0)
    pairs = {(p["label"], p["predicted"]): p["count"] for p in report["confusion"]["pairs"]}
    assert pairs == {(t, q): int(matrix[t, q]) for t, q in zip(*np.nonzero(matrix), strict=True)}
    counts = [p["count"] for p in report["confusion"]["most_confused"]]
    assert counts == sorted(counts, reverse=True) and counts[0] == matrix.max()
    assert report["confusion"]["errors"] == matrix.sum()


def test_topk_ranks_ties_by_class_id_and_handles_few_classes():
    probs = np.array([[0.2, 0.4, 0.4, 0.0], [0.25, 0.25, 0.25, 0.25]])
    ids, top = C.topk(probs, 3)
    assert ids.tolist() == [[1, 2, 0], [0, 1, 2]]
    np.testing.assert_allclose(top, [[0.4, 0.4, 0.2], [0.25, 0.25, 0.25]])
    ids, _ = C.topk(probs, 5)  # fewer classes than k
    assert ids.shape == (2, 4)
    report = C.evaluate(ids, np.array([3, 3]), 4)
    assert report["TOP1_ACC"] == 0 and report["TOP5_ACC"] == 1.0  # top-5 of 4 classes holds every class


def test_names_in_the_report_and_the_log_line():
    ids = np.array([[1, 0], [1, 0], [0, 1]])
    report = C.evaluate(ids, np.array([0, 1, 0]), 2, class_names=["cat", "dog"])
    assert report["confusion"]["most_confused"][0] == {
        "label": 0,
        "label_name": "cat",
        "predicted": 1,
        "predicted_name": "dog",
        "count": 1,
    }
    text = C.format_report(report)
    assert "top1_acc: 66.67" in text and "TOP1_ACC: 0.6667" in text
    json.dumps(report)  # serialisable as it is


def test_the_predictions_table_names_classes_by_id():
    from vtplatform.outputs.predictions import PredictionOutput

    rows = pa.table(
        {
            S.VIDEO_ID: ["a-1", "b-2"],
            S.URI: ["/v/a.mp4", "s3://b/v/b.mp4"],
            S.CLASS_IDS: pa.array([[2, 0], [1, 2]], pa.list_(pa.int32())),
            S.PROBS: pa.array([[0.7, 0.2], [0.5, 0.4]], pa.list_(pa.float32())),
        }
    )
    table = PredictionOutput(S.PREDICTION_SCHEMA, ["x", "y", "z"], "OUT").table(rows)
    assert table.schema.equals(S.PREDICTION_SCHEMA)
    assert table.column(S.CLASS_IDS).to_pylist() == [[2, 0], [1, 2]]
    assert table.column(S.CLASS_NAMES).to_pylist() == [["z", "x"], ["y", "z"]]
    np.testing.assert_allclose(table.column(S.PROBS).to_pylist(), [[0.7, 0.2], [0.5, 0.4]])
    text = format_predictions(table)
    assert "b.mp4" in text and text.count("\n") == 4
    unnamed = PredictionOutput(S.PREDICTION_SCHEMA, None, "OUT").table(rows.slice(0, 1))
    assert unnamed.column(S.CLASS_NAMES).to_pylist() == [None]
