"""What the fine-tunes share around their own training loops (``train.lstm``, ``train.tsn``).

Each model keeps its loop, read top to bottom in its module; the pieces here are the same for
every model:

- in the driver: ``place`` (where the workers run: one policy for CPU and GPU), ``fit`` (Ray
  Train on those workers over the Paddle backend, checkpoints in the run folder), ``finish``
  (the run's ``TrainSummary``, its ``history.json`` and ``curves.png`` from the last checkpoint);
- in a worker: ``start_worker`` (logging, device, collective group), ``resume`` (the last
  checkpoint, typed), ``make_scaler``/``autocast``/``optimizer_step`` (one AMP step),
  ``Recorder`` (checkpoints with a ``models.weights.CheckpointMeta``, TensorBoard scalars, the
  best checkpoint and the history at the end of an epoch). The replica check after each epoch
  is ``backend.check_replicas``.

Run files (``SAVE_DIR/RUN_NAME/``): ``tensorboard/`` (event files of the chief worker),
``history.json`` (the metrics of every epoch) and ``curves.png`` (loss and the validation
metrics per epoch), next to the checkpoints of ``train.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.models.weights import CheckpointMeta
from vtplatform.resources import TrainPlan, size_training
from vtplatform.train import checkpoint
from vtplatform.train.backend import PaddleBackendConfig, PaddleContext, setup_paddle

log = logging.getLogger(__name__)

LOSS_SCALE = 2.0**15  # float16 AMP: the GradScaler's initial loss scaling


# --- in the driver -----------------------------------------------------------------------------


def place(config: Config) -> TrainPlan:
    """The training workers' ``resources.TrainPlan``: the same policy for every model.
    ``resources.use_gpu`` decides, and on ``auto`` the seed's ``TRAIN.use_gpu`` says whether
    this phase may use the cluster's GPUs; the worker CPUs, the Paddle math threads of a worker
    (``plan.threads``, on CPU and GPU workers alike) and the data-task CPUs come from
    ``resources.plan_training``. Mixed precision (``train_run.amp``) needs GPUs."""
    plan = size_training(config, config.train.use_gpu)
    if config.train.use_gpu and not plan.use_gpu:
        log.info(
            "TRAIN.use_gpu is set but no GPU is used (resources.use_gpu=%s): training on CPU", config.resources.use_gpu
        )
    if config.train_run.amp != "none" and not plan.use_gpu:
        raise ConfigError(
            f"train_run.amp={config.train_run.amp} needs GPUs; none are used "
            "(resources.use_gpu, TRAIN.use_gpu, or no GPU in the cluster)"
        )
    return plan


def fit(train_fn, spec, plan: TrainPlan, config: Config, save_dir: str, run_name: str, **datasets):
    """Runs ``train_fn`` on ``plan.workers`` Ray Train workers placed as ``plan`` says, over the
    shared Paddle backend, with the run's checkpoints under ``save_dir/run_name``; returns Ray
    Train's result. ``datasets``: ``datasets=`` and ``dataset_config=`` for workers fed by Ray Data."""
    from ray.train import ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    run = config.train_run
    trainer = DataParallelTrainer(
        train_fn,
        train_loop_config={"spec": spec},
        backend_config=PaddleBackendConfig(),
        scaling_config=ScalingConfig(
            num_workers=plan.workers, use_gpu=plan.use_gpu, resources_per_worker=plan.worker_resources()
        ),
        run_config=checkpoint.run_config(save_dir, run_name, config.storage, run.keep_checkpoints, run.max_failures),
        **datasets,
    )
    return trainer.fit()


@dataclass(frozen=True)
class Curves:
    """What ``curves.png`` plots of a model's history: train and valid loss on the left, the
    validation metrics (0..1) on the right."""

    loss_label: str
    valid_loss: str  # history key
    quality: tuple[tuple[str, str], ...]  # (history key, legend), the first one drawn bold
    quality_title: str
    quality_label: str


@dataclass
class TrainSummary:
    """What a fine-tune did, for its log and for callers (``format()`` for people)."""

    run: str
    model_name: str
    workers: int = 1
    device: str = "cpu"
    steps_per_epoch: int = 0
    epochs: int = 0  # TRAIN.epoch
    train_videos: int = 0
    valid_videos: int = 0
    cached: int | None = None  # training videos read from the frame cache (TSN)
    skipped: dict[str, int] = field(default_factory=dict)  # list entries left out, by reason
    rejected: int = 0  # list entries rejected (written to dead_letters/)
    dead_letters: int = 0  # videos dead-lettered while training
    epochs_done: int = 0
    global_step: int = 0
    best_metric: str | None = None
    best: float | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)  # of the last finished epoch
    metrics: dict[str, Any] = field(default_factory=dict)  # of the last report (Ray Train's result)
    checkpoint: str | None = None
    elapsed_seconds: float = 0.0

    @property
    def best_valid_gap(self) -> float | None:
        return self.best if self.best_metric == "valid_gap" else None

    def format(self) -> str:
        best = "n/a (no validation set)" if self.best is None else f"{self.best:.4f} ({self.run}/best)"
        cached = f" ({self.cached} cached)" if self.cached is not None else ""
        lines = [
            f"{self.model_name} training summary",
            f"  run               {self.run}",
            f"  workers           {self.workers} x {self.steps_per_epoch} steps per epoch, {self.epochs} epochs, "
            f"on {self.device}",
            f"  videos            {self.train_videos} train{cached}, {self.valid_videos} valid",
        ]
        lines += [f"  skipped           {n} {reason}" for reason, n in sorted(self.skipped.items())]
        lines += [f"  rejected          {self.rejected} list entries"] if self.rejected else []
        lines += [f"  dead-lettered     {self.dead_letters} videos"] if self.dead_letters else []
        lines += [
            f"  epochs done       {self.epochs_done} ({self.global_step} steps)",
            "  last epoch        "
            + ", ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items() if isinstance(v, float)),
            f"  best {self.best_metric or 'metric':<12} {best}",
            f"  last checkpoint   {self.checkpoint}",
            f"  curves            {self.run}/{S.CURVES_FILE}, TensorBoard: {self.run}/{S.TENSORBOARD_DIR}",
            f"  wall time         {self.elapsed_seconds:.1f} s",
        ]
        return "\n".join(lines)


def finish(
    result, summary: TrainSummary, run: str, storage: StorageSection, curves: Curves, started: float
) -> TrainSummary:
    """Completes ``summary`` from Ray Train's ``result`` and the run's last checkpoint, and
    writes the run's ``history.json`` and ``curves.png``."""
    summary.metrics = dict(result.metrics or {})
    if result.checkpoint is not None:
        summary.checkpoint = st.redact(result.checkpoint.path)
        with result.checkpoint.as_directory() as directory, open(os.path.join(directory, S.META_FILE), "rb") as f:
            meta = CheckpointMeta.from_dict(json.loads(f.read()))
        summary.epochs_done, summary.global_step, summary.best = meta.epoch, meta.global_step, meta.best
        summary.best_metric = meta.best_metric or summary.best_metric
        summary.last_metrics = meta.history[-1] if meta.history else {}
        write_curves(meta.history, run, storage, curves)
    summary.elapsed_seconds = time.perf_counter() - started
    return summary


def write_curves(history: list[dict[str, Any]], run: str, storage: StorageSection, curves: Curves) -> None:
    """RUN/history.json and RUN/curves.png (loss and the validation metrics per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, root = st.filesystem(run, storage)
    st.write_bytes(json.dumps(history, indent=1).encode(), fs, f"{root}/{S.HISTORY_FILE}")
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_quality) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    valid = [h for h in history if curves.valid_loss in h]
    if valid:
        valid_epochs = [h["epoch"] for h in valid]
        ax_loss.plot(valid_epochs, [h[curves.valid_loss] for h in valid], marker="o", label="valid")
        for i, (key, legend) in enumerate(curves.quality):
            style = {"marker": "o", "color": "tab:green"} if i == 0 else {"marker": ".", "color": "tab:gray"}
            ax_quality.plot(valid_epochs, [h.get(key, float("nan")) for h in valid], label=legend, **style)
    ax_loss.set(xlabel="epoch", ylabel=curves.loss_label, title="loss")
    ax_quality.set(xlabel="epoch", ylabel=curves.quality_label, title=curves.quality_title, ylim=(0, 1))
    for ax in (ax_loss, ax_quality):
        if ax.get_legend_handles_labels()[0]:  # no validation: the right panel stays empty
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    st.write_bytes(buf.getvalue(), fs, f"{root}/{S.CURVES_FILE}")


# --- in a worker ---------------------------------------------------------------------------------


def start_worker(threads: int | None) -> PaddleContext:
    """First thing in a training function: our INFO lines reach the driver's console (Ray
    forwards worker stderr), then the device and the collective group (``backend.setup_paddle``)."""
    logger = logging.getLogger("vtplatform")
    logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)

    return setup_paddle(threads)


def resume(
    ctx: PaddleContext, model, optimizer, name_map, epochs: int
) -> tuple[CheckpointMeta | None, checkpoint.TrainState]:
    """The run's last checkpoint loaded into ``model`` and ``optimizer``: its meta (None on a
    fresh start) and where the run stands, out of ``epochs``."""
    raw = checkpoint.restore(model, optimizer, name_map)
    state = checkpoint.TrainState.from_meta(raw)
    if state.epoch >= epochs and ctx.is_chief:
        log.info(
            "the run already finished its %d epochs; raise TRAIN.epoch to go on, or pass another --run_name", epochs
        )
    return (CheckpointMeta.from_dict(raw) if raw else None), state


def make_scaler(amp: str):
    """The GradScaler of float16 mixed precision; None otherwise (bfloat16 needs none)."""
    import paddle

    return paddle.amp.GradScaler(init_loss_scaling=LOSS_SCALE) if amp == "float16" else None


def autocast(amp: str):
    """The forward pass's context: Paddle's O1 autocast under ``amp`` float16/bfloat16, off for none."""
    import paddle

    return paddle.amp.auto_cast(enable=amp != "none", dtype="float16" if amp == "none" else amp, level="O1")


def optimizer_step(optimizer, loss, scaler=None) -> None:
    """Backward, step and clear the gradients; through ``scaler`` when there is one."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    optimizer.clear_grad()


class Recorder:
    """A worker's checkpoints and TensorBoard scalars. ``meta`` holds what every checkpoint of
    the run records (model, config, labels, features); ``report`` adds where the run stands."""

    def __init__(self, ctx: PaddleContext, model, optimizer, name_map, meta: CheckpointMeta):
        self.ctx, self.model, self.optimizer, self.name_map, self.meta = ctx, model, optimizer, name_map, meta
        self.board = Board(ctx.is_chief)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.board.scalar(tag, value, step)

    def end_epoch(self, state: checkpoint.TrainState, metrics: dict[str, Any], best_metric: str) -> bool:
        """After an epoch and its validation: moves ``state`` to the next epoch, records
        ``metrics`` in its history and in TensorBoard (``epoch/<key>``). Returns whether this is
        the best checkpoint so far by ``best_metric`` (higher is better)."""
        best = best_metric in metrics and (state.best is None or metrics[best_metric] > state.best)
        if best:
            state.best = metrics[best_metric]
        state.epoch, state.step = metrics["epoch"] + 1, 0
        state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        for key, value in state.history[-1].items():
            if key not in ("epoch", "global_step"):
                self.board.scalar(f"epoch/{key}", value, metrics["epoch"])
        return best

    def report(
        self,
        state: checkpoint.TrainState,
        metrics: dict[str, Any],
        best: bool = False,
        epoch_partial: list[float] | None = None,
    ) -> None:
        """A checkpoint at ``state`` (every rank calls it; the chief writes, and copies it to
        ``best/`` when ``best``), and the TensorBoard files so far."""
        meta = dataclasses.replace(
            self.meta,
            epoch=state.epoch,
            step=state.step,
            global_step=state.global_step,
            best=state.best,
            history=list(state.history),
            metrics=metrics,
            epoch_partial=epoch_partial,
        )
        checkpoint.report(
            metrics,
            rank=self.ctx.rank,
            model=self.model,
            optimizer=self.optimizer,
            name_map=self.name_map,
            meta=meta.to_dict(),
            dir_name=checkpoint.dir_name(state.epoch, state.step),
            best=best,
        )
        self.board.upload()

    def close(self) -> None:
        self.board.close()


class Board:
    """TensorBoard event files, written by the chief locally and copied to RUN/tensorboard."""

    def __init__(self, enabled: bool):
        self.writer = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.dir = tempfile.mkdtemp(prefix="vtp-tb-")
        self.writer = SummaryWriter(logdir=self.dir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def upload(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        for name in os.listdir(self.dir):
            with open(os.path.join(self.dir, name), "rb") as f:
                checkpoint.write_run_file(f"{S.TENSORBOARD_DIR}/{name}", f.read())

    def close(self) -> None:
        if self.writer is not None:
            self.upload()
            self.writer.close()
