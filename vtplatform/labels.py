"""Label sets: the seed's label file (one class name per line), its fingerprint, and the top
classes of a prediction. Training, evaluation, prediction, tagging and the nightly run share them."""

from __future__ import annotations

import hashlib

import numpy as np

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
