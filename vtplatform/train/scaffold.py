"""The one training loop every model's fine-tune runs, and what it needs around it.

A model takes part through a ``Trainee`` (``train.lstm``, ``train.tsn``): it builds its network
and optimizer, gives the learning rate, feeds each worker its batches, makes one step and
validates. The loop (``train_worker``, on each Ray Train worker) does the rest, the same way for
every model:

- **resume**: the run's last checkpoint (weights, optimizer, where the run stands), else the
  pretrained weights; a checkpoint taken mid-epoch resumes that epoch at its step, with the loss
  sums of the steps before it;
- **data**: ``Trainee.batches(ctx, epoch, start_step)`` yields this worker's batches of the epoch
  from ``start_step``: a deterministic function of (``train_run.seed``, epoch, rank, workers), fed
  by Ray Data CPU tasks built in the worker (``feed``), so a resumed run sees the batches an
  uninterrupted one saw; every worker gets ``steps_per_epoch`` batches;
- **steps**: ``paddle.seed`` from (seed, epoch, step, rank) before each step (dropout), the
  learning rate set from (epoch, global step), mixed precision under ``train_run.amp`` on GPUs;
- ``train_run.log_interval``: the progress line (the model's own, the seed's format) every that
  many steps of an epoch and at its last step, with the figures averaged since the line before,
  and the same in TensorBoard;
- ``train_run.checkpoint_every_steps``: a checkpoint every that many steps of the run (global
  steps), besides one at the end of every epoch;
- **validation**: on the chief, over the whole validation set, every ``train_run.valid_interval``
  epochs and after the last; the best checkpoint by the model's metric is copied to ``best/``;
- after each epoch, the replica check (``backend.check_replicas``) and the epoch's metrics: the
  mean loss per video over all workers, the model's figures, memory, time.

In the driver: ``place`` (where the workers run), ``fit`` (Ray Train over the Paddle backend, the
run's checkpoints), ``finish`` (the ``TrainSummary``, ``history.json`` and ``curves.png``).

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vtplatform import faults
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.memory import peak_rss_mb, private_rss_mb
from vtplatform.models.weights import CheckpointMeta
from vtplatform.pipeline import blocks_dataset
from vtplatform.resources import TrainSizes, size_training
from vtplatform.train import checkpoint
from vtplatform.train.backend import (
    PaddleBackendConfig,
    PaddleContext,
    all_reduce_sum,
    check_replicas,
    setup_paddle,
)

log = logging.getLogger(__name__)

LOSS_SCALE = 2.0**15  # float16 AMP: the GradScaler's initial loss scaling
# How often Ray Train's controller polls the workers (its default is 2 s); a user's own setting wins.
POLL_ENV, POLL_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


# --- in the driver -----------------------------------------------------------------------------


def place(config: Config) -> TrainSizes:
    """The training workers' ``resources.TrainSizes``: the same policy for every model.
    ``resources.use_gpu`` decides, and on ``auto`` the seed's ``TRAIN.use_gpu`` says whether
    this phase may use the cluster's GPUs; the worker CPUs, the Paddle math threads of a worker
    (``sizes.threads``, on CPU and GPU workers alike) and the data-task CPUs come from
    ``resources.training_sizes``. Mixed precision (``train_run.amp``) needs GPUs."""
    sizes = size_training(config, config.train.use_gpu)
    if config.train.use_gpu and not sizes.use_gpu:
        log.info(
            "TRAIN.use_gpu is set but no GPU is used (resources.use_gpu=%s): training on CPU", config.resources.use_gpu
        )
    if config.train_run.amp != "none" and not sizes.use_gpu:
        raise ConfigError(
            f"train_run.amp={config.train_run.amp} needs GPUs; none are used "
            "(resources.use_gpu, TRAIN.use_gpu, or no GPU in the cluster)"
        )
    return sizes


def fit(trainee: Trainee, loop: LoopSpec, sizes: TrainSizes, config: Config, save_dir: str, run_name: str, worker=None):
    """Runs ``train_worker`` for ``trainee`` on ``sizes.workers`` Ray Train workers placed as ``sizes``
    says, over the shared Paddle backend, with the run's checkpoints under ``save_dir/run_name``;
    returns Ray Train's result. ``worker``: a function wrapping ``train_worker`` (tests)."""
    from ray.train import ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    # Ray Train's controller polls its workers every 2 s by default, so a run's end and a dead
    # worker are noticed seconds late on every run; a few polls a second cost it little.
    os.environ.setdefault(POLL_ENV, POLL_SECONDS)
    run = config.train_run
    trainer = DataParallelTrainer(
        worker or train_worker,
        train_loop_config={"trainee": trainee, "loop": loop},
        backend_config=PaddleBackendConfig(),
        scaling_config=ScalingConfig(
            num_workers=sizes.workers, use_gpu=sizes.use_gpu, resources_per_worker=sizes.worker_resources()
        ),
        run_config=checkpoint.run_config(save_dir, run_name, config.storage, run.keep_checkpoints, run.max_failures),
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
    epochs_finished: int = 0
    global_step: int = 0
    best_metric: str | None = None
    best: float | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)  # of the last finished epoch
    metrics: dict[str, Any] = field(default_factory=dict)  # of the last report (Ray Train's result)
    checkpoint: str | None = None
    elapsed_seconds: float = 0.0
    storage_retries: dict[str, int] = field(default_factory=dict)  # retried storage requests by reason (all processes)

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
            f"  epochs finished   {self.epochs_finished} ({self.global_step} steps)",
            "  last epoch        "
            + ", ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items() if isinstance(v, float)),
            f"  best {self.best_metric or 'metric':<12} {best}",
            f"  last checkpoint   {self.checkpoint}",
            f"  curves            {self.run}/{S.CURVES_FILE}, TensorBoard: {self.run}/{S.TENSORBOARD_DIR}",
            f"  wall time         {self.elapsed_seconds:.1f} s",
            f"  storage retries   {st.format_retries(self.storage_retries)}",
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
        summary.epochs_finished, summary.global_step, summary.best = meta.epoch, meta.global_step, meta.best
        summary.best_metric = meta.best_metric or summary.best_metric
        summary.last_metrics = meta.history[-1] if meta.history else {}
        write_curves(meta.history, run, storage, curves)
    summary.elapsed_seconds = time.perf_counter() - started
    summary.storage_retries = st.storage_retries()  # the driver's and its workers' (checkpoint uploads, data reads)
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


# --- the loop ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopSpec:
    """What the loop needs besides the model's ``Trainee``, decided once by the driver."""

    epochs: int
    steps_per_epoch: int  # batches every worker takes an epoch
    seed: int
    amp: str  # none | float16 | bfloat16 (GPU only)
    threads: int | None  # Paddle math threads per worker
    checkpoint_every_steps: int  # counted in steps of the run; 0: only at the end of each epoch
    log_interval: int  # steps of an epoch between progress lines; 0: none
    valid_interval: int  # epochs between validations (and after the last); 0: none
    meta: CheckpointMeta  # what every checkpoint of the run records besides where the run stands
    fault: tuple[int, int] | None = None  # (rank, global step): the driver's VTP_FAULT_INJECT drill


@dataclass
class Step:
    """What one training step did: the loss summed over the batch's videos, how many videos it had
    (0: a step that only joined the gradient all-reduce), and the model's batch figures for the
    progress line and TensorBoard (``Trainee.scalars``, in that order)."""

    loss_sum: float
    videos: int
    scalars: tuple[float, ...]


class Trainee(Protocol):
    """A model's part in ``train_worker``. Built by the driver, sent to every worker."""

    best_metric: str  # validation metric that picks best/ (higher is better)
    scalars: tuple[str, ...]  # the batch figures ``step`` reports, by name

    def build(self, seed: int) -> tuple[Any, dict[str, str] | None]:
        """(the network, its checkpoint name map)."""

    def optimizer(self, model) -> Any: ...

    def learning_rate(self, epoch: int, global_step: int) -> float: ...

    def load_pretrained(self, model, chief: bool) -> None:
        """A fresh run's starting weights (nothing without ``--pretrain``)."""

    def batches(self, ctx: PaddleContext, epoch: int, start_step: int) -> Iterator[Any]:
        """This worker's batches of ``epoch`` from ``start_step`` on (the loop takes the epoch's
        steps and no more, so an iterator may go on into the next epoch's batches)."""

    def step(self, net, optimizer, batch, amp: str, scaler) -> Step: ...

    def validate(self, model) -> dict[str, float]:
        """Metrics over the whole validation set (on the chief), keys ``valid_*``; {} without one."""

    def progress_line(self, epoch: int, step: int, steps: int, loss: float, scalars: dict[str, float]) -> str: ...

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """After an epoch's steps, on every worker: the model's own epoch metrics."""


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The random state of one step on one worker (dropout), from where the run stands alone."""
    return (seed * 1_000_003 + epoch * 10_007 + step * 101 + rank) % (2**31 - 1)


def train_worker(loop_config: dict[str, Any]):
    """The training loop of every model, on each Ray Train worker (see the module docstring).
    Returns the trained network (to a test that wraps it; Ray Train ignores it)."""
    import paddle

    trainee: Trainee = loop_config["trainee"]
    spec: LoopSpec = loop_config["loop"]
    ctx = start_worker(spec.threads)
    model, names = trainee.build(spec.seed)
    optimizer = trainee.optimizer(model)
    resumed, state = resume(ctx, model, optimizer, names, spec.epochs)
    if resumed is None:
        trainee.load_pretrained(model, ctx.is_chief)
    partial = resumed_sums(resumed, state, spec, ctx.is_chief)
    net = paddle.DataParallel(model) if ctx.world_size > 1 else model
    amp = spec.amp if ctx.use_gpu else "none"
    scaler = make_scaler(amp)
    record = Recorder(ctx, model, optimizer, names, spec.meta)
    first = state.epoch
    for epoch in range(state.epoch, spec.epochs):
        model.train()
        start = state.step if epoch == first else 0
        width = 3 + len(trainee.scalars)  # loss sum, videos, steps, then each scalar's sum
        sums = np.zeros(width)
        if partial is not None and epoch == first:  # the sums of a part-done epoch (older runs kept two)
            sums[: min(width, len(partial))] = partial[:width]
        window: list[Step] = []  # steps since the last progress line
        started, private_peak = time.perf_counter(), private_rss_mb()
        if ctx.is_chief:
            log.info("------- epoch %d: %d steps from step %d -------", epoch, spec.steps_per_epoch, start)
        steps = range(start, spec.steps_per_epoch)  # first in zip: no batch beyond the epoch's is taken
        for step, batch in zip(steps, trainee.batches(ctx, epoch, start), strict=False):
            inject_fault(spec.fault, ctx.rank, state.global_step)
            paddle.seed(step_seed(spec.seed, epoch, step, ctx.rank))
            optimizer.set_lr(trainee.learning_rate(epoch, state.global_step))
            done = trainee.step(net, optimizer, batch, amp, scaler)
            sums += [done.loss_sum, done.videos, 1, *done.scalars]
            window.append(done)
            state.step, state.global_step = step + 1, state.global_step + 1
            private_peak = max(private_peak, private_rss_mb())  # sampled while the batch is in hand
            if spec.log_interval and (state.step % spec.log_interval == 0 or state.step == spec.steps_per_epoch):
                _progress(record, trainee, ctx, epoch, state, spec, window, optimizer)
                window = []
            every = spec.checkpoint_every_steps
            if every and state.global_step % every == 0 and state.step < spec.steps_per_epoch:
                mid = {"epoch": epoch, "step": state.step, "global_step": state.global_step}
                record.report(state, mid, epoch_partial=all_reduce_sum(sums, ctx.world_size).tolist())
        totals = all_reduce_sum(sums, ctx.world_size)
        check_replicas(model, ctx.world_size)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "global_step": state.global_step,
            "train_loss": float(totals[0] / max(totals[1], 1)),
            **{
                f"train_{n}": float(s / max(totals[2], 1)) for n, s in zip(trainee.scalars[1:], totals[4:], strict=True)
            },
            "lr": float(optimizer.get_lr()),
            "epoch_seconds": time.perf_counter() - started,  # of this process: a resumed epoch's remainder
            "worker_peak_mb": peak_rss_mb(),  # the chief's peak resident memory so far (VmHWM)
            "worker_private_peak_mb": private_peak,  # its own memory at its highest step this epoch
            **trainee.end_epoch(epoch),
        }
        if ctx.is_chief:
            log.info(
                "[TRAIN] Epoch %d finished in %.1f s: loss %.6f", epoch, metrics["epoch_seconds"], metrics["train_loss"]
            )
        last = epoch + 1 == spec.epochs
        if ctx.is_chief and spec.valid_interval and ((epoch + 1) % spec.valid_interval == 0 or last):
            model.eval()
            metrics |= trainee.validate(model)
            model.train()
        best = record.end_epoch(state, metrics, trainee.best_metric)  # only the chief validates: only it finds a best
        record.report(state, metrics, best=best)
    record.close()
    return model


def _progress(record, trainee: Trainee, ctx, epoch: int, state, spec: LoopSpec, window: list[Step], optimizer) -> None:
    """The progress line over the steps since the last one (chief only), and TensorBoard's scalars."""
    if not ctx.is_chief or not window:
        return
    means = {n: float(np.mean([w.scalars[i] for w in window])) for i, n in enumerate(trainee.scalars)}
    loss = means[trainee.scalars[0]]
    log.info("%s", trainee.progress_line(epoch, state.step - 1, spec.steps_per_epoch, loss, means))
    for name, value in means.items():
        record.scalar(f"train/{name}", value, state.global_step)
    record.scalar("train/lr", float(optimizer.get_lr()), state.global_step)


def resumed_sums(resumed: CheckpointMeta | None, state, spec: LoopSpec, chief: bool) -> np.ndarray | None:
    """The chief's sums (loss, videos, steps, scalars) of the epoch a mid-epoch checkpoint left
    part-done, summed over the workers; None elsewhere and when the run starts an epoch afresh. A
    run resumed with another batch layout restarts that epoch (on every worker)."""
    if resumed is None or not state.step:
        return None
    if resumed.steps_per_epoch != spec.steps_per_epoch:
        log.warning(
            "the run resumed with a different batch layout (%s -> %s steps/epoch): epoch %d restarts",
            resumed.steps_per_epoch,
            spec.steps_per_epoch,
            state.epoch,
        )
        state.step = 0
        return None
    partial = resumed.epoch_partial
    if not chief or partial is None:
        return None
    return np.array(partial, np.float64)


def inject_fault(fault: tuple[int, int] | None, rank: int, global_step: int) -> None:
    """``VTP_FAULT_INJECT=RANK:STEP`` in the driver's environment makes that worker raise once at
    that step of the run (a marker in the run folder keeps the restarted worker from raising again)."""
    if fault is None or (rank, global_step) != tuple(fault):
        return
    fs, root = checkpoint.experiment_location()
    marker = f"{root}/_fault_injected_{rank}_{global_step}"
    if st.exists(fs, marker):
        return
    st.write_bytes(b"", fs, marker)
    raise RuntimeError(f"injected fault on worker {rank} at step {global_step} ({faults.TRAIN_ENV})")


def feed(blocks: list, load: Callable[[Any], Any], batch_size: int, batch_format: str, **iterate: Any) -> Iterator[Any]:
    """A worker's batches from its sizes: ``blocks`` (Arrow tables, in order) through ``load`` (Ray
    Data CPU tasks that run ahead of the model), in the sizes's order whichever task finishes
    first; ``iterate``: more of ``iter_batches``' options (a local shuffle, dropping a last
    partial batch, prefetching)."""
    ds = load(blocks_dataset(blocks))
    ds.context.execution_options.preserve_order = True  # this dataset's own context, not the process's
    ds.context.enable_progress_bars = False  # the workers' logs carry the progress
    return ds.iter_batches(batch_size=batch_size, batch_format=batch_format, **iterate)


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
