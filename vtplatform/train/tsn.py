"""Fine-tuning the TSN classifier on Ray Train, from videos, the seed's frames or the frame cache:
the driver (``run_train``) and the model's part in the scaffold's one training loop
(``TSNTrainee``: build, optimizer, batches, step, validate).

Each worker streams its own share of every epoch through a Ray Data pipeline (``scaffold.feed``):
CPU tasks load and augment the samples (``tsn_data.load_clips``) ahead of the model, so the
accelerator does not wait on decoding; the worker only stacks uint8 segments into batches. Gradients are
averaged across workers by ``paddle.DataParallel`` over the shared Paddle backend
(``train.backend``); checkpoints, resume and S3 go through ``train.checkpoint``.

The seed's recipe: Momentum 0.9, L2 1e-4 on every parameter, learning rate ``TRAIN.learning_rate``
times ``learning_rate_decay`` after 1/3 and again after 2/3 of the epochs, softmax
cross-entropy, per-device batch ``TRAIN.batch_size / workers``, last incomplete batch dropped.
Samples are drawn from (seed, epoch, video_id) alone, so a run resumed from a checkpoint, even
one taken mid-epoch, sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from vtplatform import faults
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError
from vtplatform.frame_cache import open_cache
from vtplatform.labels import check_label_names, label_fingerprint, read_label_names
from vtplatform.models import tsn_classifier as tc
from vtplatform.models.tsn_classifier import TSNClassifierConfig
from vtplatform.models.weights import CheckpointMeta, read_weights
from vtplatform.outputs.dead_letters import dead_letter_table, write_dead_letters
from vtplatform.pipeline import input_blocks
from vtplatform.train import checkpoint, scaffold
from vtplatform.train.scaffold import Curves, TrainSummary
from vtplatform.tsn_data import (
    ClipSpec,
    attach_cache,
    clip_frames,
    clip_spec,
    eval_samples,
    load_stage,
    read_list,
    steps_per_epoch,
    train_samples,
)

log = logging.getLogger(__name__)

MODEL_NAME = S.MODEL_TSN
BEST_METRIC = "valid_top1"
CURVES = Curves(
    loss_label="cross-entropy, per video",
    valid_loss="valid_loss",
    quality=(("valid_top1", "valid top-1"), ("valid_top5", "valid top-5")),
    quality_title="validation accuracy",
    quality_label="accuracy",
)


@dataclass(frozen=True)
class LoadResources:
    """The Ray Data stage that loads samples for a worker (``resources.decode_*``)."""

    cpus: float
    concurrency: int | None
    videos_per_task: int
    max_retries: int
    prefetch_batches: int = 2


def lr_boundaries(epochs: int, steps: int) -> list[int]:
    """Optimizer steps after which the rate drops: 1/3 and 2/3 of the epochs (the seed's
    ``piecewise_decay`` on a float boundary b switches at step ceil(b))."""
    return [math.ceil(epochs / 3 * steps), math.ceil(epochs * 2 / 3 * steps)]


def stream(samples: pa.Table, clip: ClipSpec, load: LoadResources, batch_size: int, **iterate):
    """Batches of loaded samples (``schema.TRAIN_CLIP_SCHEMA`` tables) in ``samples``' order, loaded
    by Ray Data CPU tasks running ahead of the model (``scaffold.feed``)."""
    if not samples.num_rows:
        return iter(())
    return scaffold.feed(
        input_blocks(samples, load.videos_per_task),
        lambda ds: load_stage(ds, clip, load.cpus, load.concurrency, load.max_retries),
        batch_size,
        "pyarrow",
        **iterate,
    )


def make_optimizer(learning_rate: float, momentum: float, l2_weight_decay: float, parameters):
    """The seed's Momentum with L2 decay on every parameter (the loop sets the rate of each step)."""
    import paddle

    return paddle.optimizer.Momentum(
        learning_rate=learning_rate,
        momentum=momentum,
        parameters=parameters,
        weight_decay=paddle.regularizer.L2Decay(l2_weight_decay),
    )


class DeadLetters:
    """Samples a worker could not load: logged, counted, and written once per video under the
    run's ``dead_letters/``. Training goes on without them."""

    def __init__(self, rank: int):
        self.rank = rank
        self.seen: dict[str, dict] = {}
        self.pending: list[dict] = []
        self.skipped = 0  # samples; a bad video counts once per epoch it is drawn in

    def take(self, batch: pa.Table) -> pa.Table:
        """The rows of ``batch`` that loaded."""
        errors = batch.column(S.ERROR_TYPE).to_pylist()
        if all(e is None for e in errors):
            return batch
        for row, err in zip(batch.to_pylist(), errors, strict=True):
            if err is None:
                continue
            self.skipped += 1
            if row[S.VIDEO_ID] not in self.seen:
                dead = {k: row[k] for k in (S.VIDEO_ID, S.URI, S.STAGE, S.ERROR_TYPE, S.MESSAGE)}
                self.seen[row[S.VIDEO_ID]] = dead
                self.pending.append(dead)
                log.warning("skipping %s: %s/%s %s", st.redact(row[S.URI]), row[S.STAGE], err, row[S.MESSAGE])
        return batch.filter(pa.array([e is None for e in errors], pa.bool_()))

    def flush(self, epoch: int) -> None:
        if not self.pending:
            return
        import io

        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(dead_letter_table(self.pending), buf)
        checkpoint.write_run_file(
            f"{S.DEAD_LETTERS_DIR}/train-e{epoch:04d}-r{self.rank:03d}-{time.time_ns()}.parquet", buf.getvalue()
        )
        self.pending = []

    def summary(self) -> str:
        reasons = Counter(f"{d[S.STAGE]}/{d[S.ERROR_TYPE]}" for d in self.seen.values())
        text = f"{len(self.seen)} videos dead-lettered so far ({self.skipped} samples skipped)"
        return f"{text}: {dict(reasons)}" if reasons else text


def _to_tensors(batch: pa.Table, segments: int, size: int):
    import paddle

    frames = paddle.to_tensor(clip_frames(batch, segments, size))  # (B, seg, size, size, 3) uint8
    labels = paddle.to_tensor(np.asarray(batch.column(S.LABEL).to_pylist(), np.int64))
    return frames, labels


def train_step(
    net, optimizer, frames, labels, amp: str = "none", scaler=None, weight: float = 1.0
) -> tuple[float, float]:
    """One optimizer step; returns (loss, top-1 accuracy) on the batch. ``weight`` 0 makes a step
    that only joins the gradient all-reduce (for a worker none of whose batch loaded)."""
    import paddle.nn.functional as F

    with scaffold.autocast(amp):
        logits = net(frames)  # (B, num_classes)
        loss = F.cross_entropy(logits.astype("float32"), labels)
    scaffold.optimizer_step(optimizer, loss * weight, scaler)
    accuracy = float((logits.argmax(axis=1) == labels).astype("float32").mean())
    return float(loss), accuracy


@dataclass
class TSNTrainee:
    """TSN's part in ``scaffold.train_worker``: decided by the driver, sent to every worker (which
    keeps its own dead letters and last good batch in it)."""

    model: TSNClassifierConfig
    epochs: int
    steps_per_epoch: int
    batch_size: int  # per worker
    valid_batch_size: int
    base_rate: float  # TRAIN.learning_rate
    rate_decay: float  # TRAIN.learning_rate_decay
    momentum: float
    l2_weight_decay: float
    seed: int
    pretrain: str | None
    train: ClipSpec
    valid: ClipSpec | None
    train_entries: pa.Table
    valid_entries: pa.Table | None
    load: LoadResources
    best_metric: str = BEST_METRIC
    scalars: tuple[str, ...] = ("loss", "top1")
    _dead: DeadLetters | None = None
    _last_good: pa.Table | None = None
    _epoch: int = 0
    _stream: Any = None  # the worker's batches, all the epochs left (``batches``)

    @property
    def segments(self) -> int:
        return self.train.seg_num * self.train.seglen

    def learning_rate(self, epoch: int, global_step: int) -> float:
        """The seed's piecewise schedule, counted in optimizer steps of the run."""
        drops = sum(global_step >= b for b in lr_boundaries(self.epochs, self.steps_per_epoch))
        return self.base_rate * self.rate_decay**drops

    def build(self, seed: int):
        model = tc.build(self.model, seed=seed)
        return model, tc.name_map(model)

    def optimizer(self, model):
        return make_optimizer(self.base_rate, self.momentum, self.l2_weight_decay, model.parameters())

    def load_pretrained(self, model, chief: bool) -> None:
        if self.pretrain:
            tc.load_pretrained(model, read_weights(self.pretrain, self.train.storage).state)

    def batches(self, ctx, epoch: int, start_step: int):
        """This worker's samples from ``start_step`` of ``epoch`` on (``tsn_data.train_samples``: each
        drawn from (seed, epoch, video)), loaded by Ray Data CPU tasks running ahead of the model:
        one stream for all the epochs left, so loading runs on across epoch ends."""
        self._dead = self._dead or DeadLetters(ctx.rank)
        if self._stream is None:
            epochs = range(epoch, self.epochs)
            samples = train_samples(
                self.train_entries, epochs, self.seed, ctx.rank, ctx.world_size, self.batch_size, start_step
            )
            batches = stream(
                samples, self.train, self.load, self.batch_size, prefetch_batches=self.load.prefetch_batches
            )
            self._stream = iter(batches)
        return self._stream

    def step(self, net, optimizer, batch, amp: str, scaler) -> scaffold.Step:
        """One step on the samples that loaded; a worker none of whose batch loaded joins the
        gradient all-reduce with a zero-weight step."""
        batch = self._dead.take(batch)
        size = self.train.target_size
        if not batch.num_rows:
            frames, labels = _to_tensors(self._last_good, self.segments, size) if self._last_good else _blank(self)
            train_step(net, optimizer, frames, labels, amp, scaler, weight=0.0)
            return scaffold.Step(0.0, 0, (float("nan"), float("nan")))
        self._last_good = batch
        loss, accuracy = train_step(net, optimizer, *_to_tensors(batch, self.segments, size), amp, scaler)
        return scaffold.Step(loss * batch.num_rows, batch.num_rows, (loss, accuracy))

    def progress_line(self, epoch: int, step: int, steps: int, loss: float, scalars: dict[str, float]) -> str:
        return f"[TRAIN] Epoch {epoch}, iter {step + 1}/{steps}, loss {loss:.6f}, top1_acc {scalars['top1']:.3f}"

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        self._epoch = epoch
        self._dead.flush(epoch)
        return {"dead_letters": len(self._dead.seen)}

    def validate(self, model) -> dict[str, float]:
        """TOP1/TOP5 and loss over the whole VALID list (on the chief)."""
        import paddle
        import paddle.nn.functional as F

        if self.valid is None or self.valid_entries is None:
            return {}
        sums = np.zeros(4, np.float64)  # loss sum, top-1 hits, top-5 hits, videos
        samples = eval_samples(self.valid_entries)
        size, segments = self.valid.target_size, self.valid.seg_num * self.valid.seglen
        with paddle.no_grad():
            for batch in stream(samples, self.valid, self.load, self.valid_batch_size):
                batch = self._dead.take(batch)
                if not batch.num_rows:
                    continue
                frames, labels = _to_tensors(batch, segments, size)
                logits = model(frames)
                top5 = paddle.topk(logits, k=min(5, logits.shape[1]), axis=1)[1].numpy()
                y = labels.numpy()
                loss = float(F.cross_entropy(logits, labels, reduction="sum"))
                sums += [loss, (top5[:, 0] == y).sum(), (top5 == y[:, None]).any(axis=1).sum(), len(y)]
        self._dead.flush(self._epoch)
        n = max(float(sums[3]), 1.0)
        metrics = {"valid_loss": sums[0] / n, "valid_top1": sums[1] / n, "valid_top5": sums[2] / n}
        log.info(
            "[VALID] loss %.6f, top1_acc %.4f, top5_acc %.4f (%d videos)",
            metrics["valid_loss"], metrics["valid_top1"], metrics["valid_top5"], int(sums[3]),
        )  # fmt: skip
        return metrics | {"valid_videos": int(sums[3])}


def _blank(trainee: TSNTrainee):
    import paddle

    size = trainee.train.target_size
    return paddle.zeros([1, trainee.segments, size, size, 3], "uint8"), paddle.zeros([1], "int64")


# -- the driver ------------------------------------------------------------------------------------


@dataclass
class Lists:
    """What the driver read: the phases' entries and counts, and the list lines it rejected."""

    train: pa.Table
    valid: pa.Table | None
    cache: dict[str, Any] | None
    cached: int
    rejected: list[dict] = field(default_factory=list)


def read_lists(config: Config) -> Lists:
    """The TRAIN and VALID lists (and what the frame cache holds of them), before any worker starts."""
    train, valid, run = config.train, config.valid, config.train_run
    if not train.filelist:
        raise ConfigError("TRAIN.filelist is not set: point it at a TSN list ('path label' per line)")
    train_list = read_list(train.filelist, config)
    valid_list = read_list(valid.filelist, config) if valid.filelist and run.valid_interval else None
    train_entries = train_list.entries
    valid_entries = valid_list.entries if valid_list is not None else None
    cache, cached = None, 0
    if config.frame_cache.path:
        cache, index = open_cache(config.frame_cache.path, config.storage)
        train_entries, cached = attach_cache(train_entries, index)
        if valid_entries is not None:
            valid_entries, _ = attach_cache(valid_entries, index)
        log.info(
            "frame cache %s holds %d of %d training videos; the others are decoded",
            st.redact(config.frame_cache.path),
            cached,
            len(train_list),
        )
    rejected = train_list.rejected + (valid_list.rejected if valid_list is not None else [])
    return Lists(train_entries, valid_entries, cache, cached, rejected)


def prepare(
    config: Config, pretrain: str | None, sizes, names: list[str] | None
) -> tuple[TSNTrainee, scaffold.LoopSpec, Lists]:
    """The trainee and the loop, from the lists, the recipe and where the workers run."""
    train, valid, run = config.train, config.valid, config.train_run
    workers = sizes.workers
    batch, valid_batch = train.batch_size // workers, max(1, valid.batch_size // workers)
    if batch < 1:
        raise ConfigError(
            f"TRAIN.batch_size={train.batch_size} is the global batch; it cannot be split over {workers} workers"
        )
    lists = read_lists(config)
    steps = steps_per_epoch(lists.train.num_rows, workers, batch)
    if steps < 1:
        raise ConfigError(
            f"{lists.train.num_rows} training videos cannot fill one batch of {batch} per worker "
            f"on {workers} workers: lower TRAIN.batch_size or add videos"
        )
    if train.total_videos is not None and train.total_videos != lists.train.num_rows:
        log.info(
            "TRAIN.total_videos=%d is not used: the list has %d videos (%d steps per epoch)",
            train.total_videos,
            lists.train.num_rows,
            steps,
        )
    if pretrain is None:
        log.warning("no --pretrain weights: the TSN classifier trains from random init")
    res = config.resources
    model = TSNClassifierConfig.from_model_section(config.model)
    trainee = TSNTrainee(
        model=model,
        epochs=train.epoch,
        steps_per_epoch=steps,
        batch_size=batch,
        valid_batch_size=valid_batch,
        base_rate=train.learning_rate,
        rate_decay=train.learning_rate_decay,
        momentum=train.momentum,
        l2_weight_decay=train.l2_weight_decay,
        seed=run.seed,
        pretrain=pretrain,
        train=clip_spec(config, "train", run.seed, lists.cache),
        valid=clip_spec(config, "valid", run.seed, lists.cache) if lists.valid is not None else None,
        train_entries=lists.train,
        valid_entries=lists.valid,
        load=LoadResources(sizes.task_cpus, res.decode_concurrency, res.decode_batch_size, res.decode_max_retries),
    )
    meta = CheckpointMeta(
        model_name=MODEL_NAME,
        model=asdict(model),
        num_classes=model.num_classes,
        config=config.to_dict(),
        best_metric=BEST_METRIC,
        steps_per_epoch=steps,
        num_workers=workers,
        label_fingerprint=label_fingerprint(names, config.model.num_classes),
        extra={"depth": model.depth},  # at the top as well, as TSN checkpoints always had it
    )
    loop = scaffold.LoopSpec(
        epochs=train.epoch,
        steps_per_epoch=steps,
        seed=run.seed,
        amp=run.amp,
        threads=sizes.threads,
        checkpoint_every_steps=run.checkpoint_every_steps,
        log_interval=run.log_interval,
        valid_interval=run.valid_interval if lists.valid is not None else 0,
        meta=meta,
        fault=faults.train_fault(),
    )
    return trainee, loop, lists


def run_train(
    config: Config,
    save_dir: str,
    pretrain: str | None = None,
    label_file: str | None = None,
    run_name: str | None = None,
    worker=None,
) -> TrainSummary:
    """Fine-tunes TSN on ``TRAIN.filelist``, validating on ``VALID.filelist``; checkpoints go to
    ``save_dir/<run_name, train_run.run_name or TSN>``; rerunning with the same name resumes.
    ``label_file`` names the classes (recorded as the label set). Needs ``ray.init()``.
    ``worker`` replaces the workers' function (tests wrap ``scaffold.train_worker`` with it)."""
    start = time.perf_counter()
    if config.model.name != MODEL_NAME:
        raise ConfigError(f"MODEL.name is {config.model.name!r}; this trainer fine-tunes TSN")
    run = config.train_run
    where = scaffold.place(config)
    if pretrain:
        read_weights(pretrain, config.storage)  # a bad path fails here, not in every worker
    names = read_label_names(label_file, config.storage) if label_file else None
    if names is not None:
        check_label_names(names, config.model.num_classes, label_file)
    trainee, loop, lists = prepare(config, pretrain, where, names)
    name = run_name or run.run_name or MODEL_NAME
    run_uri = checkpoint.run_uri(save_dir, name)
    fs, root = st.filesystem(run_uri, config.storage)
    write_dead_letters(lists.rejected, fs, root, prefix="manifest")
    log.info(
        "TSN fine-tune: %d workers (%s, %.2f CPUs each), %d x %d videos per step, %d steps per epoch, %d epochs -> %s",
        where.workers, "GPU" if where.use_gpu else "CPU", where.cpus_per_worker, where.workers, trainee.batch_size,
        loop.steps_per_epoch, loop.epochs, st.redact(run_uri),
    )  # fmt: skip
    result = scaffold.fit(trainee, loop, where, config, save_dir, name, worker=worker)
    dead = {v for f in st.list_files(fs, f"{root}/{S.DEAD_LETTERS_DIR}", ".parquet") for v in _ids(fs, f)}
    summary = TrainSummary(
        st.redact(run_uri),
        MODEL_NAME,
        workers=where.workers,
        device="gpu" if where.use_gpu else "cpu",
        steps_per_epoch=loop.steps_per_epoch,
        epochs=loop.epochs,
        train_videos=lists.train.num_rows,
        valid_videos=lists.valid.num_rows if lists.valid is not None else 0,
        cached=lists.cached,
        rejected=len(lists.rejected),
        dead_letters=len(dead),
        best_metric=BEST_METRIC,
    )
    return scaffold.finish(result, summary, run_uri, config.storage, CURVES, start)


def _ids(fs, path: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[S.VIDEO_ID], filesystem=fs).column(S.VIDEO_ID).to_pylist()
