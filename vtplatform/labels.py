"""Label sets: the seed's label file (one class name per line), its fingerprint, the top
classes of a prediction, and the seed's per-video JSON of them. Training, evaluation, prediction, tagging and the nightly run share them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import ConfigError, StorageSection


def read_label_names(path: str, storage: StorageSection) -> list[str]:
    """The seed's label file: UTF-8, one name per line, line index = class id."""
    fs, inner = st.filesystem(path, storage)
    try:
        with fs.open_input_stream(inner) as f:
            text = f.read().decode("utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"cannot read label file {st.redact(path)}: {exc}") from exc
    names = text.split("\n")
    if names and names[-1] == "":
        names.pop()
    return [n.rstrip("\r") for n in names]


def label_fingerprint(names: list[str] | None, num_classes: int) -> str:
    """Identifies a label set: sha256 of the names, or of the class count when there are none."""
    text = "\n".join(names) if names is not None else f"num_classes={num_classes}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_label_names(names: list[str], num_classes: int, path: str) -> None:
    if len(names) != num_classes:
        raise ConfigError(
            f"label file {st.redact(path)} has {len(names)} names, the model {num_classes} classes (MODEL.num_classes)"
        )


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """(N, k) class ids per row, best first; ties go to the lower class id."""
    k = min(k, probs.shape[1])
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def seed_json_bytes(row: dict) -> bytes:
    """The seed's per-video JSON, with the key ``class_id`` (the original wrote ``'class_id``)."""
    items: list[Any] = [row[S.VIDEO_ID]]
    names = row[S.CLASS_NAMES] or [None] * len(row[S.CLASS_IDS])
    for class_id, name, prob in zip(row[S.CLASS_IDS], names, row[S.PROBS], strict=True):
        items.append({"class_id": int(class_id), "class_name": name, "probability": float(prob)})
    return json.dumps(items, ensure_ascii=False).encode("utf-8")


def label_names_for(label_file: str | None, num_classes: int, storage: StorageSection) -> list[str] | None:
    """The class names of ``label_file`` checked against ``num_classes``; None without a file."""
    if not label_file:
        return None
    names = read_label_names(label_file, storage)
    check_label_names(names, num_classes, label_file)
    return names
