"""Weight files: read them (official fluid files, ``.npz``, our checkpoints), map them onto a
model by name, and fingerprint what was loaded."""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
MODEL_FILE = "model.pdparams"


class WeightsError(ValueError):
    """A weight file that does not fit the model (missing names, wrong shapes, unreadable)."""


def fingerprint(named_arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """sha256 over (name bytes + little-endian float32 bytes) per parameter, in the order given.

    For the official table order this equals the ``weights_sha256`` of VideoTag's golden files.
    """
    h = hashlib.sha256()
    for name, value in named_arrays:
        h.update(name.encode())
        h.update(np.ascontiguousarray(value, dtype="<f4").tobytes())
    return h.hexdigest()


def read_state(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a ``.pdparams`` (fluid pickle or paddle.save), an ``.npz``, or a checkpoint folder."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.exists():
        raise WeightsError(f"weight file not found: {path}")
    if p.suffix == ".npz":
        with np.load(p) as data:
            return {k: data[k] for k in data.files}
    try:
        with open(p, "rb") as f:
            state = pickle.load(f)
    except Exception:  # paddle.save of tensors needs paddle to unpickle
        import paddle

        state = paddle.load(str(p), return_numpy=True)
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: expected a mapping of parameter names to arrays, got {type(state).__name__}")
    return {str(k): np.asarray(v) for k, v in state.items()}


def assign(model, state: Mapping[str, np.ndarray], name_map: Mapping[str, str], skip: Iterable[str] = ()) -> list[str]:
    """Copies ``state[name]`` into ``model.state_dict()[name_map[name]]`` for every name.

    ``skip`` lists names left at their initial values. Returns the names of ``state`` that the
    model did not use. Raises ``WeightsError`` on a missing name or a shape mismatch.
    """
    import paddle

    skip = set(skip)
    params = model.state_dict()
    missing = [n for n in name_map if n not in state and n not in skip]
    if missing:
        raise WeightsError(f"{len(missing)} parameters missing from the weight file, e.g. {missing[:5]}")
    for name, key in name_map.items():
        if name in skip:
            continue
        value, target = state[name], params[key]
        if tuple(value.shape) != tuple(target.shape):
            raise WeightsError(f"{name}: file has shape {list(value.shape)}, model expects {list(target.shape)}")
        paddle.assign(paddle.to_tensor(value.astype(np.float32)).astype(target.dtype), output=target)
    return sorted(set(state) - set(name_map))


def model_fingerprint(model, name_map: Mapping[str, str]) -> str:
    params = model.state_dict()
    return fingerprint((name, params[key].numpy()) for name, key in name_map.items())


def save_state(model, name_map: Mapping[str, str], path: str | Path) -> None:
    """Saves weights under their fluid names, the format the official files use."""
    params = model.state_dict()
    state = {name: params[key].numpy().astype(np.float32) for name, key in name_map.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=2)
