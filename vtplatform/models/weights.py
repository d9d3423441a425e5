"""Weight files: read them (official fluid files, ``.npz``, our checkpoints), map them onto a
model by name, and fingerprint what was loaded. ``read_weights`` opens a weight file or a
checkpoint folder of a fine-tune (written by ``train.checkpoint``), local or on S3."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import ConfigError, StorageSection

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
CHECKPOINT_PATTERN = re.compile(r"^epoch_\d+_step_\d+$")


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
        p = p / S.MODEL_FILE
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


# --- checkpoints of a fine-tune -------------------------------------------------------------


def list_checkpoints(run: str, storage: StorageSection) -> list[str]:
    """The run's checkpoint directories (URIs or paths as given), oldest first."""
    fs, root = st.filesystem(run, storage)
    if not st.exists(fs, root):
        return []
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root))
    names = sorted(
        i.base_name for i in infos if i.type == pafs.FileType.Directory and CHECKPOINT_PATTERN.match(i.base_name)
    )
    return [f"{run.rstrip('/')}/{n}" for n in names if st.exists(fs, f"{root}/{n}/{S.META_FILE}")]


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's ``meta.json``, as every trainer writes it (``train.scaffold``) and readers
    check it. ``from_dict`` also reads the dicts older versions wrote: AttentionLSTM checkpoints
    without ``model_name`` (their dims under ``model``), TSN ones without ``model`` (``num_classes``
    and ``depth`` at the top). Keys it does not name stay in ``extra`` and are written back."""

    model_name: str | None  # "AttentionLSTM", "TSN"; None for a meta that does not say
    model: dict[str, Any] = field(default_factory=dict)  # the model's dims: its config dataclass as a dict
    num_classes: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the whole run config
    # where the run stands (train.checkpoint.TrainState)
    epoch: int = 0  # the epoch in progress; a checkpoint at the end of epoch e has epoch e+1, step 0
    step: int = 0
    global_step: int = 0
    best: float | None = None  # the best value of best_metric so far (the checkpoint in best/)
    history: list[dict[str, Any]] = field(default_factory=list)  # per finished epoch, its metrics
    metrics: dict[str, Any] = field(default_factory=dict)  # of the report this checkpoint came with
    best_metric: str | None = None  # the metric best/ is chosen by (higher is better)
    epoch_partial: list[float] | None = None  # (loss sum, videos) of a part-done epoch, where kept
    steps_per_epoch: int | None = None  # the batch layout the run had
    num_workers: int | None = None
    label_fingerprint: str | None = None  # labels.label_fingerprint of the class names
    features: dict[str, Any] | None = None  # provenance of the features trained on (AttentionLSTM)
    extra: dict[str, Any] = field(default_factory=dict)  # keys not named above, as written

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``meta.json`` (``extra`` at the top level, never over a named key)."""
        named = asdict(self)
        return {**named.pop("extra"), **named}

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> CheckpointMeta:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in meta.items() if k in names}
        model = known.get("model") if isinstance(known.get("model"), dict) else {}
        known["model_name"] = known.get("model_name") or ("AttentionLSTM" if model else None)
        known.setdefault("num_classes", model.get("num_classes"))
        known["history"] = list(known.get("history") or [])
        return cls(**known, extra={k: v for k, v in meta.items() if k not in names})


@dataclass
class LoadedWeights:
    state: dict[str, np.ndarray]
    meta: dict[str, Any] | None  # None for a bare weight file
    source: str

    @property
    def checkpoint(self) -> CheckpointMeta | None:
        """The typed meta of a checkpoint; None for a bare weight file."""
        return None if self.meta is None else CheckpointMeta.from_dict(self.meta)

    @property
    def model_name(self) -> str | None:
        """The model a checkpoint holds (``CheckpointMeta.model_name``); None for a bare weight file."""
        return None if self.meta is None else self.checkpoint.model_name

    def require(self, model_name: str) -> LoadedWeights:
        """These weights, unless they are a checkpoint of another model."""
        if self.model_name not in (None, model_name):
            raise ConfigError(
                f"{st.redact(self.source)} is {_article(self.model_name)} checkpoint, not {_article(model_name)} one"
            )
        return self


def _article(name: str) -> str:
    return f"{'an' if name[0] in 'AEIOU' else 'a'} {name}"


def read_weights(uri: str, storage: StorageSection) -> LoadedWeights:
    """Weights for evaluation or inference from any of: a checkpoint directory, a run folder
    (its ``best/``, else its latest checkpoint), a weight file (``.pdparams``, ``.npz``), or the
    seed's path without the ``.pdparams`` suffix. Local or ``s3://``."""
    fs, path = st.filesystem(uri, storage)
    from pyarrow import fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound and st.exists(fs, path + ".pdparams"):
        uri, path, info = uri + ".pdparams", path + ".pdparams", fs.get_file_info(path + ".pdparams")
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"weights not found: {st.redact(uri)}")
    if info.type == pafs.FileType.File:
        with _local(fs, path, uri, storage) as local:
            return LoadedWeights(read_state(local), None, uri)
    for candidate in (uri, f"{uri.rstrip('/')}/{S.BEST_DIR}", *reversed(list_checkpoints(uri, storage))):
        cfs, cpath = st.filesystem(candidate, storage)
        if st.exists(cfs, f"{cpath}/{S.META_FILE}") and st.exists(cfs, f"{cpath}/{S.MODEL_FILE}"):
            meta = json.loads(cfs.open_input_stream(f"{cpath}/{S.META_FILE}").read().decode("utf-8"))
            with _local(cfs, f"{cpath}/{S.MODEL_FILE}", candidate, storage) as local:
                return LoadedWeights(read_state(local), meta, candidate)
    raise ConfigError(
        f"{st.redact(uri)} holds no checkpoint ({S.META_FILE} + {S.MODEL_FILE}), best/ or epoch_* checkpoints"
    )


@contextlib.contextmanager
def _local(fs, path: str, uri: str, storage: StorageSection) -> Iterator[str]:
    from pyarrow import fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vtp-weights-") as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        with fs.open_input_stream(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        yield local
