"""YouTube-8M metrics, as VideoTag reports them: Hit@1, PERR, GAP, mAP and per-class AP.

With probabilities P (N, C) and multi-hot labels Y (N, C), and k = ``top_k`` (20):

* **Hit@1**: the fraction of videos whose top-scored class is a positive.
* **PERR**: per video with n positives, the precision of its n top-scored classes (counting only
  scores > 0); a video without positives counts 0, as in YouTube-8M's ``eval_util``.
* **GAP** (global average precision): every video's k top-scored (class, score) pairs are pooled
  and ranked by score; GAP is the average precision of that ranking with **all** positives of Y
  in the denominator, including those outside any top k.
* **per-class AP** (``per_class_ap``), as ``eval_util.EvaluationMetrics`` computes it (its
  ``map_calculator``, fed by ``top_k_by_class``): class c's AP ranks only the pooled top-k pairs
  that are class c's (the videos where c made the video's top k), with **all** positives of
  class c, in every video, in the denominator; a class without positives gets None (0.0 in the
  seed's log line). **mAP** (``map``) is its mean over the classes that have a positive.
* ``per_class_ap_full_ranking`` / ``map_full_ranking``: the AP of one class's ranking of all N
  videos (scikit-learn's ``average_precision_score``), and its mean; not what VideoTag printed.

Tied scores are grouped at one threshold (scikit-learn's rule) in every AP, so results do not
depend on row order; YouTube-8M breaks ties by a random shuffle instead. Top-k selection breaks
ties by the lower class id. The accumulator keeps the full probabilities: N x C floats.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vtplatform.labels import top_k_indices

log = logging.getLogger(__name__)


def average_precision(scores: np.ndarray, labels: np.ndarray, num_positives: int | None = None) -> float:
    """AP of a ranking by ``scores`` (ties grouped); ``num_positives`` defaults to the positives
    in ``labels`` and may be larger (positives that never got a score). 0.0 without positives."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0
    total = int(labels.sum()) if num_positives is None else int(num_positives)
    if total <= 0 or scores.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_group = np.r_[s[1:] != s[:-1], True]  # the end of each run of equal scores
    tp = np.cumsum(y)[last_of_group]
    seen = np.nonzero(last_of_group)[0] + 1
    precision = tp / seen
    recall_gain = np.diff(np.r_[0, tp]) / total
    return float(np.sum(precision * recall_gain))


def hit_at_one(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per video: 1.0 if its top class is a positive."""
    return labels[np.arange(len(labels)), np.argmax(probs, axis=1)].astype(np.float64)


def precision_at_equal_recall(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per video: precision of its top-k classes, k = its number of positives (0 if none)."""
    out = np.zeros(len(labels))
    order = np.argsort(-probs, axis=1, kind="stable")
    for row, k in enumerate(labels.sum(axis=1).astype(int)):
        if k == 0:
            continue
        top = order[row, :k]
        out[row] = float(np.sum(labels[row, top] * (probs[row, top] > 0))) / k
    return out


@dataclass
class Youtube8mMetrics:
    """Accumulates batches; ``result()`` gives the metrics of everything seen."""

    num_classes: int
    top_k: int = 20
    _probs: list[np.ndarray] = field(default_factory=list)
    _labels: list[np.ndarray] = field(default_factory=list)
    _losses: list[np.ndarray] = field(default_factory=list)

    def accumulate(self, probs: np.ndarray, labels: np.ndarray, losses: np.ndarray | None = None) -> None:
        probs = np.asarray(probs, dtype=np.float32)
        labels = (np.asarray(labels) > 0).astype(np.uint8)
        if probs.shape != labels.shape or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs {probs.shape} and labels {labels.shape} must both be (N, {self.num_classes})")
        self._probs.append(probs)
        self._labels.append(labels)
        if losses is not None:
            self._losses.append(np.asarray(losses, dtype=np.float64).reshape(-1))

    def __len__(self) -> int:
        return sum(len(p) for p in self._probs)

    def result(self) -> dict[str, Any]:
        if not self._probs:
            raise ValueError("no examples were accumulated")
        probs, labels = np.concatenate(self._probs), np.concatenate(self._labels)
        return compute_metrics(probs, labels, self.top_k, np.concatenate(self._losses) if self._losses else None)


def gap(probs: np.ndarray, labels: np.ndarray, top_k: int = 20) -> float:
    top = top_k_indices(probs, top_k)
    rows = np.arange(len(probs))[:, None]
    return average_precision(probs[rows, top].ravel(), labels[rows, top].ravel(), int(np.sum(labels > 0)))


def per_class_ap_top_k(probs: np.ndarray, labels: np.ndarray, top_k: int = 20) -> list[float | None]:
    """Per-class AP as YouTube-8M's ``eval_util`` computes it: over the class's share of the
    pooled top-k pairs, with all of the class's positives in the denominator (None: no positives)."""
    labels = (np.asarray(labels) > 0).astype(np.uint8)
    positives = labels.sum(axis=0)
    top = top_k_indices(probs, top_k)
    rows = np.broadcast_to(np.arange(len(probs))[:, None], top.shape)
    classes, scores, hits = top.ravel(), probs[rows, top].ravel(), labels[rows, top].ravel()
    return [
        average_precision(scores[classes == c], hits[classes == c], int(positives[c])) if positives[c] else None
        for c in range(labels.shape[1])
    ]


def per_class_ap_full_ranking(probs: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """Per-class AP over the ranking of all videos (scikit-learn's definition; None: no positives)."""
    labels = (np.asarray(labels) > 0).astype(np.uint8)
    positives = labels.sum(axis=0)
    return [average_precision(probs[:, c], labels[:, c]) if positives[c] else None for c in range(labels.shape[1])]


def _mean_defined(values: list[float | None]) -> float:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else 0.0


def compute_metrics(
    probs: np.ndarray, labels: np.ndarray, top_k: int = 20, losses: np.ndarray | None = None
) -> dict[str, Any]:
    """Every metric of the module docstring, as one JSON-ready dict."""
    labels = (np.asarray(labels) > 0).astype(np.uint8)
    per_class = per_class_ap_top_k(probs, labels, top_k)
    full = per_class_ap_full_ranking(probs, labels)
    return {
        "num_videos": len(probs),
        "top_k": top_k,
        "gap": gap(probs, labels, top_k),
        "hit_at_one": float(hit_at_one(probs, labels).mean()),
        "perr": float(precision_at_equal_recall(probs, labels).mean()),
        "map": _mean_defined(per_class),
        "avg_loss": float(losses.mean()) if losses is not None and len(losses) else None,
        "num_classes_with_positives": sum(ap is not None for ap in per_class),
        "per_class_ap": per_class,
        "map_full_ranking": _mean_defined(full),
        "per_class_ap_full_ranking": full,
    }


def seed_log_line(metrics: dict[str, Any], info: str = "[TEST] Finish") -> str:
    """The line VideoTag's ``Youtube8mMetrics.finalize_and_log_out`` logs (``aps``: the
    ``eval_util`` per-class AP over the pooled top-k pairs, 0.0 for classes without positives)."""
    aps = [0.0 if ap is None else ap for ap in metrics["per_class_ap"]]
    return (
        f"{info}\tavg_hit_at_one: {metrics['hit_at_one']},\tavg_perr: {metrics['perr']},"
        f"\tavg_loss :{metrics['avg_loss']},\taps: {aps},\tgap:{metrics['gap']}"
    )


def batch_metrics(probs: np.ndarray, labels: np.ndarray, top_k: int = 20) -> tuple[float, float, float]:
    """(Hit@1, PERR, GAP) of one batch, as the seed's per-iteration line shows them."""
    labels = (np.asarray(labels) > 0).astype(np.uint8)
    hit = float(hit_at_one(probs, labels).mean())
    perr = float(precision_at_equal_recall(probs, labels).mean())
    return hit, perr, float(gap(probs, labels, top_k))


def batch_log_line(info: str, loss: float, hit: float, perr: float, gap_: float) -> str:
    """The seed's per-iteration line: ``info , loss = L, Hit@1 = H, PERR = P, GAP = G``."""
    return f"{info} , loss = {loss:.6f}, Hit@1 = {hit:.2f}, PERR = {perr:.2f}, GAP = {gap_:.2f}"


def report_json(metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    return json.dumps({**(extra or {}), **metrics}, indent=1, ensure_ascii=False)
