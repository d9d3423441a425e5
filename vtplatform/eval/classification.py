"""Single-label classification results: TOP1/TOP5 accuracy, per-class accuracy, a confusion
summary, and top-k predictions as a table (the seed's per-video JSON is ``predict.seed_json_bytes``).

Everything works from each video's top-k class ids (k >= 5), its label and, for the loss, the
probability it gave its label, so a stage can reduce (N, num_classes) probabilities to a few
numbers per video before they reach the driver. Ties in probability rank the lower class id first.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from vtplatform import storage as st
from vtplatform.config import StorageSection
from vtplatform.labels import top_k_indices

log = logging.getLogger(__name__)


def topk(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) probabilities -> (ids, probs), each (N, min(k, C)), highest first."""
    ids = top_k_indices(probs, k)
    return ids, np.take_along_axis(probs, ids, axis=1)


def evaluate(
    top_ids: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    label_probs: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    most_confused: int = 20,
) -> dict[str, Any]:
    """The report: ``TOP1_ACC``, ``TOP5_ACC`` (fractions), mean cross-entropy ``loss`` when
    ``label_probs`` is given, ``per_class`` (support, correct, accuracy) for every class with
    support, and ``confusion``: the nonzero off-diagonal (label, top-1) counts, most frequent first."""
    labels = np.asarray(labels, np.int64)
    top_ids = np.asarray(top_ids, np.int64)
    n = len(labels)
    if top_ids.shape[0] != n:
        raise ValueError(f"{top_ids.shape[0]} predictions for {n} labels")
    if n == 0:
        raise ValueError("no videos to evaluate")
    top1 = top_ids[:, 0]
    hit1 = top1 == labels
    hit5 = (top_ids[:, :5] == labels[:, None]).any(axis=1)

    def name(c: int) -> str | None:
        return class_names[c] if class_names is not None and c < len(class_names) else None

    per_class = []
    for c in np.unique(labels).tolist():
        mask = labels == c
        per_class.append(
            {
                "class_id": c,
                "class_name": name(c),
                "support": int(mask.sum()),
                "correct": int(hit1[mask].sum()),
                "accuracy": float(hit1[mask].mean()),
            }
        )
    pairs = Counter(zip(labels[~hit1].tolist(), top1[~hit1].tolist(), strict=True))
    confusion = [
        {"label": t, "label_name": name(t), "predicted": p, "predicted_name": name(p), "count": c}
        for (t, p), c in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    report: dict[str, Any] = {
        "num_videos": n,
        "num_classes": num_classes,
        "TOP1_ACC": float(hit1.mean()),
        "TOP5_ACC": float(hit5.mean()),
        "mean_class_accuracy": float(np.mean([p["accuracy"] for p in per_class])),
    }
    if label_probs is not None:
        report["loss"] = float(-np.mean(np.log(np.maximum(np.asarray(label_probs, np.float64), 1e-30))))
    report["per_class"] = per_class
    report["confusion"] = {"most_confused": confusion[:most_confused], "pairs": confusion, "errors": int((~hit1).sum())}
    return report


def format_report(report: dict[str, Any], prefix: str = "[EVAL] eval finished.") -> str:
    """The seed's log line (accuracies in percent), then the worst classes."""
    loss = report.get("loss", 0.0)
    top1, top5 = report["TOP1_ACC"], report["TOP5_ACC"]
    lines = [f"{prefix}\tLoss: {loss:.6f},\ttop1_acc: {100 * top1:.2f}, \ttop5_acc: {100 * top5:.2f}"]
    lines.append(
        f"TOP1_ACC: {report['TOP1_ACC']:.4f}  TOP5_ACC: {report['TOP5_ACC']:.4f}  ({report['num_videos']} videos)"
    )
    worst = sorted(report["per_class"], key=lambda p: (p["accuracy"], -p["support"]))[:5]
    for p in worst:
        name = p["class_name"] or ""
        lines.append(
            f"  class {p['class_id']:>5} {name:<20} accuracy {p['accuracy']:.3f} ({p['correct']}/{p['support']})"
        )
    for c in report["confusion"]["most_confused"][:5]:
        lines.append(f"  confused: {c['label']} -> {c['predicted']} x{c['count']}")
    return "\n".join(lines)


def write_json(obj: Any, uri: str, storage: StorageSection) -> None:
    fs, path = st.filesystem(uri, storage)
    st.write_bytes(json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8"), fs, path)
