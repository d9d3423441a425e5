"""Checkpoints of a fine-tune, written through Ray Train storage (a local folder or an S3 prefix).

Layout under ``SAVE_DIR/RUN_NAME/`` (``SAVE_DIR`` local or ``s3://``)::

    epoch_002_step_0000000/       one directory per report; Ray Train keeps the last N
        model.pdparams            weights under the model's fluid names (the official files' format)
        optimizer.npz             optimizer accumulators, keyed by the model's parameter names
        meta.json                 a models.weights.CheckpointMeta: model, config, epoch, step, metrics,
                                  label-set fingerprint, history
    best/                         a copy of the best checkpoint by the model's metric (CheckpointMeta.best_metric)
    tensorboard/, curves.png ...  other run files (``write_run_file``; ``train.scaffold`` writes these)

In a training function (model-agnostic; ``name_map`` maps file names to state_dict keys, or None)::

    meta = checkpoint.restore(model, optimizer, name_map)      # None on a fresh start
    state = checkpoint.TrainState.from_meta(meta)
    ...
    checkpoint.report(metrics, rank=ctx.rank, model=model, optimizer=optimizer, name_map=name_map,
                      meta={**state.to_meta(), "config": ...}, dir_name=checkpoint.dir_name(epoch, step),
                      best=is_best)

(the trainers do this through ``train.scaffold.resume`` and ``train.scaffold.Recorder``, which
write a ``models.weights.CheckpointMeta``), and in the driver ``run_config(save_dir, run_name,
storage, keep_last, max_failures)`` gives the ``RunConfig`` (retention of the last N,
``FailureConfig`` restarts, rerun with the same name to resume after a driver restart). ``models.weights.read_weights`` opens any of these for evaluation
or inference.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import StorageSection
from vtplatform.models import weights as wts

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where a run stands: ``epoch`` is the epoch in progress (0-based) and ``step`` the steps of
    it already done; a checkpoint at the end of epoch e has epoch e+1, step 0."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> TrainState:
        if not meta:
            return cls()
        return cls(meta["epoch"], meta["step"], meta["global_step"], meta.get("best"), list(meta.get("history", [])))

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)


def dir_name(epoch: int, step: int) -> str:
    """Checkpoint directory names sort in training order."""
    return f"epoch_{epoch:03d}_step_{step:07d}"


def _keys(model, name_map: Mapping[str, str] | None) -> dict[str, str]:
    return dict(name_map) if name_map is not None else {k: k for k in model.state_dict()}


def save(
    directory: str | Path, *, model, optimizer, name_map: Mapping[str, str] | None, meta: Mapping[str, Any]
) -> None:
    """Writes one checkpoint directory locally."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wts.save_state(model, _keys(model, name_map), directory / S.MODEL_FILE)
    if optimizer is not None:
        np.savez(directory / S.OPTIMIZER_FILE, **optimizer_state(model, optimizer))
    (directory / S.META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str), encoding="utf-8")


def load(directory: str | Path, *, model, optimizer, name_map: Mapping[str, str] | None) -> dict[str, Any]:
    """Restores a local checkpoint directory into ``model`` (and ``optimizer``); returns its meta."""
    directory = Path(directory)
    if optimizer is not None and (directory / S.OPTIMIZER_FILE).exists():
        materialize_optimizer(model, optimizer)  # creates the accumulators; touches the weights, loaded next
    wts.assign(model, wts.read_state(directory / S.MODEL_FILE), _keys(model, name_map))
    if optimizer is not None and (directory / S.OPTIMIZER_FILE).exists():
        with np.load(directory / S.OPTIMIZER_FILE) as data:
            load_optimizer_state(model, optimizer, {k: data[k] for k in data.files})
    return json.loads((directory / S.META_FILE).read_text(encoding="utf-8"))


# --- optimizer state, keyed by parameter names that do not depend on process history ---------

_COUNTER = re.compile(r"_\d+$")


def _accumulator_names(optimizer) -> list[str]:
    """The optimizer's own tensors: its state dict without the LR scheduler's entry."""
    return [k for k in optimizer.state_dict() if k not in ("LR_Scheduler", "master_weights")]


def _accumulator_keys(model, optimizer) -> dict[str, str]:
    """{optimizer tensor name: "<state_dict key>/<accumulator>"}. Paddle names accumulators
    ``<param.name>_<accumulator>_<counter>`` with process-global counters; we do not."""
    by_param_name = {p.name: key for key, p in model.named_parameters()}
    names = sorted(by_param_name, key=len, reverse=True)
    out = {}
    for var_name in _accumulator_names(optimizer):
        owner = next((n for n in names if var_name.startswith(n + "_")), None)
        if owner is None:
            raise RuntimeError(f"optimizer tensor {var_name} belongs to no parameter of the model")
        out[var_name] = f"{by_param_name[owner]}/{_COUNTER.sub('', var_name[len(owner) + 1 :])}"
    return out


def optimizer_state(model, optimizer) -> dict[str, np.ndarray]:
    state = optimizer.state_dict()
    return {key: np.asarray(state[var].numpy()) for var, key in _accumulator_keys(model, optimizer).items()}


def materialize_optimizer(model, optimizer) -> None:
    """Creates the optimizer's accumulators (Paddle makes them at the first step) with one step
    on zero gradients. It may move the weights through weight decay: load them afterwards."""
    import paddle

    params = [p for p in model.parameters() if not p.stop_gradient]
    if not params or _accumulator_names(optimizer):
        return
    loss = paddle.add_n([(p * 0.0).sum() for p in params])
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()


def load_optimizer_state(model, optimizer, saved: Mapping[str, np.ndarray]) -> None:
    import paddle

    current = optimizer.state_dict()
    keys = _accumulator_keys(model, optimizer)
    missing = sorted(set(keys.values()) - set(saved))
    if saved and not keys:
        raise RuntimeError(f"the optimizer has no accumulators to restore {len(saved)} saved tensors into")
    if missing:
        raise ValueError(
            f"optimizer state lacks {len(missing)} entries, e.g. {missing[:3]} (a different optimizer or model?)"
        )
    for var, key in keys.items():
        target = current[var]
        if tuple(target.shape) != tuple(saved[key].shape):
            raise ValueError(f"optimizer state {key}: shape {list(saved[key].shape)}, expected {list(target.shape)}")
        paddle.assign(paddle.to_tensor(saved[key]).astype(target.dtype), output=target)


# --- inside a Ray Train worker --------------------------------------------------------------


def restore(model, optimizer, name_map: Mapping[str, str] | None) -> dict[str, Any] | None:
    """Loads Ray Train's latest checkpoint of this run (after a worker failure or a driver restart)
    into ``model`` and ``optimizer``; returns its meta, or None when the run starts fresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        meta = load(directory, model=model, optimizer=optimizer, name_map=name_map)
    log.info("resumed from %s (epoch %d, step %d)", st.redact(checkpoint.path), meta["epoch"], meta["step"])
    return meta


def report(
    metrics: Mapping[str, Any],
    *,
    rank: int,
    model=None,
    optimizer=None,
    name_map: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
    dir_name: str | None = None,
    best: bool = False,
) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches a checkpoint of ``model`` when given
    one, and copies it to ``best/`` when ``best``. Every rank must call this at the same point."""
    import ray.train
    from ray.train import Checkpoint

    if rank != 0 or model is None:
        ray.train.report(dict(metrics), checkpoint=None, checkpoint_dir_name=dir_name)
        return
    with tempfile.TemporaryDirectory(prefix="vtp-ckpt-", ignore_cleanup_errors=True) as tmp:
        save(tmp, model=model, optimizer=optimizer, name_map=name_map, meta=meta or {})
        if best:
            _publish_best(tmp)
        ray.train.report(dict(metrics), checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=dir_name)


def experiment_location():
    """(pyarrow filesystem, path) of this run's folder, from inside a worker."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, storage.experiment_fs_path


def write_run_file(relative: str, data: bytes) -> None:
    """Writes a file under the run's folder (local or S3), from inside a worker."""
    fs, root = experiment_location()
    st.write_bytes(data, fs, f"{root}/{relative}")


def _publish_best(local_dir: str) -> None:
    """Replaces ``best/``; meta.json goes last, so a reader that finds it finds a whole checkpoint."""
    fs, root = experiment_location()
    target = f"{root}/{S.BEST_DIR}"
    if st.exists(fs, f"{target}/{S.META_FILE}"):
        fs.delete_file(f"{target}/{S.META_FILE}")
    names = sorted(os.listdir(local_dir), key=lambda n: n == S.META_FILE)
    for name in names:
        st.write_bytes(Path(local_dir, name).read_bytes(), fs, f"{target}/{name}")


# --- in the driver --------------------------------------------------------------------------


def run_config(save_dir: str, run_name: str, storage: StorageSection, keep_last: int, max_failures: int):
    """Ray Train's ``RunConfig`` for ``save_dir`` (a local folder or ``s3://`` prefix): keeps the
    last ``keep_last`` checkpoints and restarts failed worker groups up to ``max_failures`` times."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    if st.is_s3(save_dir):
        fs, path = st.filesystem(save_dir, storage)
        location: dict[str, Any] = {"storage_path": path.rstrip("/"), "storage_filesystem": fs}
    else:
        location = {"storage_path": st.canonical_uri(save_dir)}
    return RunConfig(
        name=run_name,
        checkpoint_config=CheckpointConfig(num_to_keep=keep_last),
        failure_config=FailureConfig(max_failures=max_failures),
        **location,
    )


def run_uri(save_dir: str, run_name: str) -> str:
    return f"{save_dir.rstrip('/')}/{run_name}"
