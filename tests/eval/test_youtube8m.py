"""YouTube-8M metrics against independent implementations: scikit-learn's AP definition written
out here, and GAP and eval_util's per-class AP by brute force over the pooled top-k predictions."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from vtplatform.eval.youtube8m import (
    Youtube8mMetrics,
    average_precision,
    batch_log_line,
    batch_metrics,
    compute_metrics,
    gap,
    hit_at_one,
    precision_at_equal_recall,
    seed_log_line,
)


def sklearn_style_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's average_precision_score: AP = sum_n (R_n - R_{n-1}) P_n over the distinct
    score thresholds, highest first (the precision/recall curve built threshold by threshold)."""
    thresholds = sorted(set(scores.tolist()), reverse=True)
    total = labels.sum()
    ap, prev_recall = 0.0, 0.0
    for thr in thresholds:
        predicted = scores >= thr
        tp = np.sum(predicted & (labels == 1))
        precision = tp / np.sum(predicted)
        recall = tp / total
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def brute_force_gap(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Pool every video's k highest (score, label) pairs, sort, and average the precision at each
    positive, dividing by ALL positives in the labels (no ties in the inputs used here)."""
    pairs = []
    for row in range(len(probs)):
        ranked = sorted(range(probs.shape[1]), key=lambda c: -probs[row, c])[:k]
        pairs += [(probs[row, c], labels[row, c]) for c in ranked]
    pairs.sort(key=lambda p: -p[0])
    hits, total = 0, labels.sum()
    ap = 0.0
    for rank, (_, label) in enumerate(pairs, start=1):
        if label:
            hits += 1
            ap += hits / rank
    return ap / total


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    labels = (rng.random((40, 9)) < 0.25).astype(np.uint8)
    labels[0] = 0  # a video without positives
    labels[:, 3] = 0  # a class without positives
    probs = np.clip(0.35 * labels + rng.random((40, 9)) * 0.7, 0, 1).astype(np.float32)
    return probs, labels


def brute_force_eval_util_aps(probs: np.ndarray, labels: np.ndarray, k: int) -> list[float | None]:
    """YouTube-8M eval_util's per-class AP, written out: each video gives its k highest-scored
    (class, score, label) triplets; a class's AP ranks its own triplets and divides by ALL of the
    class's positives (None for a class without any; no ties in the inputs used here)."""
    num_classes = probs.shape[1]
    by_class: dict[int, list[tuple[float, int]]] = {c: [] for c in range(num_classes)}
    for row in range(len(probs)):
        for c in sorted(range(num_classes), key=lambda c: -probs[row, c])[:k]:
            by_class[c].append((float(probs[row, c]), int(labels[row, c])))
    aps = []
    for c in range(num_classes):
        total = int(labels[:, c].sum())
        if total == 0:
            aps.append(None)
            continue
        hits, ap = 0, 0.0
        for rank, (_, label) in enumerate(sorted(by_class[c], key=lambda p: -p[0]), start=1):
            if label:
                hits += 1
                ap += hits / rank
        aps.append(ap / total)
    return aps


def test_full_ranking_per_class_ap_matches_sklearn_definition(data):
    probs, labels = data
    result = compute_metrics(probs, labels)
    for c in range(labels.shape[1]):
        if labels[:, c].sum() == 0:
            assert result["per_class_ap_full_ranking"][c] is None
        else:
            expected = sklearn_style_ap(probs[:, c], labels[:, c])
            assert result["per_class_ap_full_ranking"][c] == pytest.approx(expected, abs=1e-12)
    expected_map = np.mean([sklearn_style_ap(probs[:, c], labels[:, c]) for c in range(9) if labels[:, c].sum()])
    assert result["map_full_ranking"] == pytest.approx(expected_map, abs=1e-12)
    assert result["num_classes_with_positives"] == 8


@pytest.mark.parametrize("k", [20, 4])
def test_per_class_ap_is_eval_utils_over_the_pooled_top_k(k):
    rng = np.random.default_rng(3)
    labels = (rng.random((60, 30)) < 0.15).astype(np.uint8)
    labels[:, 7] = 0  # a class without positives
    probs = (0.25 * labels + rng.random((60, 30)) * 0.75).astype(np.float32)
    assert len(np.unique(probs)) == probs.size  # no ties
    result = compute_metrics(probs, labels, top_k=k, losses=np.ones(60))
    expected = brute_force_eval_util_aps(probs, labels, k)
    assert result["per_class_ap"][7] is None and expected[7] is None
    np.testing.assert_allclose(
        [ap for ap in result["per_class_ap"] if ap is not None], [ap for ap in expected if ap is not None], atol=1e-12
    )
    assert result["map"] == pytest.approx(np.mean([ap for ap in expected if ap is not None]), abs=1e-12)
    full = [sklearn_style_ap(probs[:, c], labels[:, c]) if labels[:, c].sum() else None for c in range(30)]
    differ = [c for c in range(30) if full[c] is not None and abs(full[c] - expected[c]) > 1e-3]
    assert len(differ) >= 10  # positives outside the top k count as missed: not the full-ranking AP
    assert result["map"] != pytest.approx(result["map_full_ranking"], abs=1e-3)
    aps = eval(seed_log_line(result).split("aps: ")[1].split(",\tgap")[0])  # what the seed's line prints
    assert aps == [0.0 if ap is None else ap for ap in result["per_class_ap"]] and aps[7] == 0.0


def test_ap_groups_tied_scores_like_sklearn():
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.2])
    labels = np.array([0, 1, 0, 1, 1, 0])
    assert average_precision(scores, labels) == pytest.approx(sklearn_style_ap(scores, labels), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx((2 / 3) * (2 / 4) + (1 / 3) * (3 / 6))


@pytest.mark.parametrize("k", [1, 2, 3, 20])
def test_gap_matches_brute_force_with_all_positives_in_the_denominator(data, k):
    probs, labels = data
    assert gap(probs, labels, k) == pytest.approx(brute_force_gap(probs, labels, k), abs=1e-12)


def test_gap_counts_positives_outside_the_top_k():
    probs = np.array([[0.9, 0.8, 0.1], [0.7, 0.2, 0.6]])
    labels = np.array([[1, 0, 1], [0, 0, 1]])
    # top-1 pairs: (0.9, 1), (0.7, 0); 3 positives in all -> AP = (1/1) / 3
    assert gap(probs, labels, 1) == pytest.approx(1 / 3)
    # all pairs ranked: 0.9 (1), 0.8, 0.7, 0.6 (1), 0.2, 0.1 (1) -> (1 + 2/4 + 3/6) / 3
    assert gap(probs, labels, 3) == pytest.approx((1 + 2 / 4 + 3 / 6) / 3)


def test_hit_at_one_and_perr_by_hand():
    probs = np.array([[0.1, 0.9, 0.3], [0.8, 0.1, 0.7], [0.2, 0.3, 0.1], [0.5, 0.4, 0.3]])
    labels = np.array([[0, 1, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(hit_at_one(probs, labels), [1, 0, 0, 1])
    # PERR: k = positives; row 1: top-2 = {0, 2} -> 1/2; row 2: no positives -> 0; row 3: top-2 = {0, 1} -> 1
    np.testing.assert_allclose(precision_at_equal_recall(probs, labels), [1.0, 0.5, 0.0, 1.0])


def test_accumulating_in_batches_equals_one_pass(data):
    probs, labels = data
    losses = np.arange(40, dtype=np.float64)
    metrics = Youtube8mMetrics(9, top_k=3)
    for start in range(0, 40, 7):
        metrics.accumulate(probs[start : start + 7], labels[start : start + 7], losses[start : start + 7])
    assert len(metrics) == 40
    assert metrics.result() == compute_metrics(probs, labels, 3, losses)
    assert metrics.result()["avg_loss"] == pytest.approx(19.5)
    with pytest.raises(ValueError, match="must both be"):
        metrics.accumulate(probs[:, :5], labels[:, :5])


def test_perfect_and_reversed_rankings():
    labels = np.eye(4, dtype=np.uint8)[[0, 1, 2, 3, 0, 1]]
    perfect = compute_metrics(labels * 0.9 + 0.05, labels)
    assert (
        perfect["gap"] == pytest.approx(1.0) and perfect["map"] == pytest.approx(1.0) and perfect["hit_at_one"] == 1.0
    )
    worst = compute_metrics(1 - (labels * 0.9 + 0.05), labels)
    assert worst["hit_at_one"] == 0.0 and worst["gap"] < 0.5


def test_seed_log_formats(data):
    probs, labels = data
    result = compute_metrics(probs, labels, 20, np.ones(40))
    line = seed_log_line(result)
    assert re.fullmatch(
        r"\[TEST\] Finish\tavg_hit_at_one: [\d.]+,\tavg_perr: [\d.]+,\tavg_loss :1\.0,\taps: \[.*\],\tgap:[\d.]+", line
    )
    aps = eval(line.split("aps: ")[1].split(",\tgap")[0])  # the seed printed a Python list
    assert len(aps) == 9 and aps[3] == 0.0
    hit, perr, batch_gap = batch_metrics(probs, labels)
    assert (hit, batch_gap) == (pytest.approx(result["hit_at_one"]), pytest.approx(result["gap"]))
    batch = batch_log_line("[TRAIN] Epoch 0, iter 3", 2.5, hit, perr, batch_gap)
    assert re.fullmatch(
        r"\[TRAIN\] Epoch 0, iter 3 , loss = 2\.500000, Hit@1 = [\d.]{4}, PERR = [\d.]{4}, GAP = [\d.]{4}", batch
    )


def test_brute_force_helpers_agree_on_a_tiny_exhaustive_case():
    """Every labelling of 2 videos x 3 classes with fixed distinct scores."""
    probs = np.array([[0.9, 0.4, 0.2], [0.7, 0.6, 0.1]])
    for bits in itertools.product([0, 1], repeat=6):
        labels = np.array(bits, dtype=np.uint8).reshape(2, 3)
        if labels.sum() == 0:
            continue
        for k in (1, 2, 3):
            assert gap(probs, labels, k) == pytest.approx(brute_force_gap(probs, labels, k), abs=1e-12)
