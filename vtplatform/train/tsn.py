"""Fine-tuning the TSN classifier on Ray Train, from videos, the seed's frames or the frame cache.

Each worker streams its own share of every epoch through a Ray Data pipeline: CPU tasks load
and augment the samples (``tsn_data.load_clips``) ahead of the model, so the accelerator does
not wait on decoding; the worker only stacks uint8 segments into batches. Gradients are
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

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError
from vtplatform.frame_cache import open_cache
from vtplatform.labels import check_label_names, label_fingerprint, read_label_names
from vtplatform.models import tsn_classifier as tc
from vtplatform.models.tsn_classifier import TSNClassifierConfig
from vtplatform.models.weights import CheckpointMeta, read_weights
from vtplatform.pipeline import blocks_dataset, dead_letter_table, input_blocks
from vtplatform.train import checkpoint, scaffold
from vtplatform.train.backend import all_reduce_sum, check_replicas
from vtplatform.train.scaffold import Curves, TrainSummary
from vtplatform.tsn_data import (
    ClipSpec,
    attach_cache,
    clip_frames,
    clip_spec,
    eval_plan,
    load_stage,
    read_list,
    steps_per_epoch,
    train_plan,
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


@dataclass(frozen=True)
class TSNTrainSpec:
    """Everything a worker needs, decided once by the driver."""

    model: TSNClassifierConfig
    epochs: int
    batch_size: int  # per worker
    valid_batch_size: int  # per worker
    learning_rate: float
    learning_rate_decay: float
    momentum: float
    l2_weight_decay: float
    seed: int
    pretrain: str | None
    train: ClipSpec
    valid: ClipSpec | None
    train_entries: pa.Table
    valid_entries: pa.Table | None
    load: LoadResources
    threads: int | None
    amp: str  # none | float16 | bfloat16 (GPU only)
    checkpoint_every_steps: int
    log_interval: int
    valid_interval: int
    label_fingerprint: str
    config: dict[str, Any] = field(default_factory=dict)  # the whole config, for meta.json

    @property
    def segments(self) -> int:
        return self.train.seg_num * self.train.seglen


def lr_boundaries(epochs: int, steps: int) -> list[int]:
    """Optimizer steps after which the rate drops: 1/3 and 2/3 of the epochs (the seed's
    ``piecewise_decay`` on a float boundary b switches at step ceil(b))."""
    return [math.ceil(epochs / 3 * steps), math.ceil(epochs * 2 / 3 * steps)]


def make_optimizer(spec: TSNTrainSpec, parameters, steps: int):
    """The seed's Momentum with L2 decay on every parameter, and its piecewise schedule."""
    import paddle

    base, decay = spec.learning_rate, spec.learning_rate_decay
    bounds = lr_boundaries(spec.epochs, steps)
    schedule = paddle.optimizer.lr.PiecewiseDecay(bounds, [base, base * decay, base * decay * decay])
    optimizer = paddle.optimizer.Momentum(
        learning_rate=schedule,
        momentum=spec.momentum,
        parameters=parameters,
        weight_decay=paddle.regularizer.L2Decay(spec.l2_weight_decay),
    )
    return optimizer, schedule


def stream(plan: pa.Table, clip: ClipSpec, load: LoadResources, batch_size: int):
    """Batches of loaded samples (``schema.TRAIN_CLIP_SCHEMA`` tables) in plan order, loaded by Ray Data CPU tasks."""
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = blocks_dataset(input_blocks(plan, load.videos_per_task))
    ds = load_stage(ds, clip, load.cpus, load.concurrency, load.max_retries)
    return ds.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=load.prefetch_batches)


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
    net, optimizer, schedule, frames, labels, amp: str = "none", scaler=None, weight: float = 1.0
) -> tuple[float, float]:
    """One optimizer step; returns (loss, top-1 accuracy) on the batch. ``weight`` 0 makes a step
    that only joins the gradient all-reduce (for a worker none of whose batch loaded)."""
    import paddle.nn.functional as F

    with scaffold.autocast(amp):
        logits = net(frames)  # (B, num_classes)
        loss = F.cross_entropy(logits.astype("float32"), labels)
    scaffold.optimizer_step(optimizer, loss * weight, scaler)
    schedule.step()
    accuracy = float((logits.argmax(axis=1) == labels).astype("float32").mean())
    return float(loss), accuracy


def validate(model, spec: TSNTrainSpec, rank: int, world: int, dead: DeadLetters) -> dict[str, float]:
    """TOP1/TOP5 and loss on the VALID list, each worker on its share, summed over workers
    (a collective: every rank calls it)."""
    import paddle
    import paddle.nn.functional as F

    sums = np.zeros(4, np.float64)  # loss sum, top-1 hits, top-5 hits, videos
    if spec.valid is not None and spec.valid_entries is not None:
        model.eval()
        plan = eval_plan(spec.valid_entries, rank, world)
        size, segments = spec.valid.target_size, spec.valid.seg_num * spec.valid.seglen
        with paddle.no_grad():
            for batch in stream(plan, spec.valid, spec.load, spec.valid_batch_size) if plan.num_rows else []:
                batch = dead.take(batch)
                if not batch.num_rows:
                    continue
                frames, labels = _to_tensors(batch, segments, size)
                logits = model(frames)
                top5 = paddle.topk(logits, k=min(5, logits.shape[1]), axis=1)[1].numpy()
                y = labels.numpy()
                loss = float(F.cross_entropy(logits, labels, reduction="sum"))
                sums += [loss, (top5[:, 0] == y).sum(), (top5 == y[:, None]).any(axis=1).sum(), len(y)]
        model.train()
    sums = all_reduce_sum(sums, world)
    n = max(float(sums[3]), 1.0)
    return {
        "valid_loss": sums[0] / n,
        "valid_top1": sums[1] / n,
        "valid_top5": sums[2] / n,
        "valid_videos": int(sums[3]),
    }


def train_loop(spec: TSNTrainSpec):
    """Runs on every Ray Train worker; returns the trained model (useful to tests)."""
    import paddle

    ctx = scaffold.start_worker(spec.threads)
    rank, world = ctx.rank, ctx.world_size
    model = tc.build(spec.model, seed=spec.seed)
    names = tc.name_map(model)
    steps = steps_per_epoch(spec.train_entries.num_rows, world, spec.batch_size)
    optimizer, schedule = make_optimizer(spec, model.parameters(), steps)
    resumed, state = scaffold.resume(ctx, model, optimizer, names, spec.epochs)
    if resumed is not None:
        schedule.step(state.global_step)  # the rate where the run left off
    elif spec.pretrain:
        tc.load_pretrained(model, read_weights(spec.pretrain, spec.train.storage).state)
    amp = spec.amp if ctx.use_gpu else "none"  # mixed precision is a GPU feature
    scaler = scaffold.make_scaler(amp)
    net = paddle.DataParallel(model) if world > 1 else model
    model.train()
    record = scaffold.Recorder(ctx, model, optimizer, names, checkpoint_meta(spec, steps, world))
    dead = DeadLetters(rank)
    plan = train_plan(
        spec.train_entries, range(state.epoch, spec.epochs), spec.seed, rank, world, spec.batch_size, state.step
    )
    batches = iter(stream(plan, spec.train, spec.load, spec.batch_size)) if plan.num_rows else iter(())
    size, last_good = spec.train.target_size, None
    for epoch in range(state.epoch, spec.epochs):
        started, losses, accs = time.perf_counter(), [], []
        for step in range(state.step if epoch == state.epoch else 0, steps):
            batch = dead.take(next(batches))
            if batch.num_rows:
                last_good = batch
                loss, acc = train_step(net, optimizer, schedule, *_to_tensors(batch, spec.segments, size), amp, scaler)
                losses.append(loss)
                accs.append(acc)
            else:  # nothing of this batch loaded: join the all-reduce with a zero-weight step
                frames, labels = _to_tensors(last_good, spec.segments, size) if last_good is not None else _blank(spec)
                train_step(net, optimizer, schedule, frames, labels, amp, scaler, weight=0.0)
            state.global_step += 1
            if rank == 0 and spec.log_interval and (step + 1) % spec.log_interval == 0:
                _log_step(record, epoch, step, steps, state.global_step, losses, accs, schedule.get_lr(), spec)
            every = spec.checkpoint_every_steps
            if every and state.global_step % every == 0 and step + 1 < steps:
                state.epoch, state.step = epoch, step + 1
                mid = {
                    "epoch": epoch,
                    "global_step": state.global_step,
                    "train_loss": float(np.mean(losses or [np.nan])),
                }
                record.report(state, mid)
        dead.flush(epoch)
        check_replicas(model, world)
        metrics = {
            "epoch": epoch,
            "global_step": state.global_step,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "train_top1": float(np.mean(accs)) if accs else float("nan"),
            "lr": float(schedule.get_lr()),
            "epoch_seconds": time.perf_counter() - started,
            "dead_letters": len(dead.seen),
        }
        last = epoch + 1 == spec.epochs
        if spec.valid is not None and spec.valid_interval and ((epoch + 1) % spec.valid_interval == 0 or last):
            metrics |= validate(model, spec, rank, world, dead)
            dead.flush(epoch)
        if rank == 0:
            log.info(
                "[TRAIN] Epoch %d finished in %.1f s: %s; %s",
                epoch,
                metrics["epoch_seconds"],
                _format(metrics),
                dead.summary(),
            )
        best = record.end_epoch(state, metrics, BEST_METRIC)
        record.report(state, metrics, best=best)
    record.close()
    return model


def checkpoint_meta(spec: TSNTrainSpec, steps: int, workers: int) -> CheckpointMeta:
    """What every checkpoint of the run records besides where the run stands (``depth`` at
    the top as well, as TSN checkpoints always had it)."""
    return CheckpointMeta(
        model_name=MODEL_NAME,
        model=asdict(spec.model),
        num_classes=spec.model.num_classes,
        config=spec.config,
        best_metric=BEST_METRIC,
        steps_per_epoch=steps,
        num_workers=workers,
        label_fingerprint=spec.label_fingerprint,
        extra={"depth": spec.model.depth},
    )


def _log_step(record, epoch: int, step: int, steps: int, global_step: int, losses, accs, lr, spec) -> None:
    """The progress line over the last log_interval steps, and the same in TensorBoard."""
    recent = slice(-spec.log_interval, None)
    avg_loss, avg_acc = np.mean(losses[recent] or [np.nan]), np.mean(accs[recent] or [np.nan])
    log.info(
        "[TRAIN] Epoch %d, iter %d/%d, loss %.6f, top1_acc %.3f, lr %.6g", epoch, step + 1, steps, avg_loss, avg_acc, lr
    )
    record.scalar("train/loss", float(avg_loss), global_step)
    record.scalar("train/top1", float(avg_acc), global_step)
    record.scalar("train/lr", float(lr), global_step)


def _blank(spec: TSNTrainSpec):
    import paddle

    size = spec.train.target_size
    return paddle.zeros([1, spec.segments, size, size, 3], "uint8"), paddle.zeros([1], "int64")


def _format(metrics: dict[str, Any]) -> str:
    parts = [f"loss {metrics['train_loss']:.6f}", f"top1 {metrics['train_top1']:.3f}"]
    if "valid_top1" in metrics:
        parts.append(
            f"[VALID] loss {metrics['valid_loss']:.6f}, top1_acc {metrics['valid_top1']:.4f}, "
            f"top5_acc {metrics['valid_top5']:.4f} ({metrics['valid_videos']} videos)"
        )
    return ", ".join(parts)


# -- the driver ------------------------------------------------------------------------------------


def prepare(config: Config, pretrain: str | None, plan, labels: str) -> tuple[TSNTrainSpec, dict[str, Any]]:
    """Reads the lists (and the frame cache) and checks the recipe, before any worker starts."""
    train, valid, run = config.train, config.valid, config.train_run
    workers = plan.workers
    if not train.filelist:
        raise ConfigError("TRAIN.filelist is not set: point it at a TSN list ('path label' per line)")
    batch, valid_batch = train.batch_size // workers, max(1, valid.batch_size // workers)
    if batch < 1:
        raise ConfigError(
            f"TRAIN.batch_size={train.batch_size} is the global batch; it cannot be split over {workers} workers"
        )
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
    steps = steps_per_epoch(train_entries.num_rows, workers, batch)
    if steps < 1:
        raise ConfigError(
            f"{train_entries.num_rows} training videos cannot fill one batch of {batch} per worker "
            f"on {workers} workers: lower TRAIN.batch_size or add videos"
        )
    if train.total_videos is not None and train.total_videos != train_entries.num_rows:
        log.info(
            "TRAIN.total_videos=%d is not used: the list has %d videos (%d steps per epoch)",
            train.total_videos,
            train_entries.num_rows,
            steps,
        )
    if pretrain is None:
        log.warning("no --pretrain weights: the TSN classifier trains from random init")
    res = config.resources
    spec = TSNTrainSpec(
        model=TSNClassifierConfig.from_model_section(config.model),
        epochs=train.epoch,
        batch_size=batch,
        valid_batch_size=valid_batch,
        learning_rate=train.learning_rate,
        learning_rate_decay=train.learning_rate_decay,
        momentum=train.momentum,
        l2_weight_decay=train.l2_weight_decay,
        seed=run.seed,
        pretrain=pretrain,
        train=clip_spec(config, "train", run.seed, cache),
        valid=clip_spec(config, "valid", run.seed, cache) if valid_entries is not None else None,
        train_entries=train_entries,
        valid_entries=valid_entries,
        load=LoadResources(plan.task_cpus, res.decode_concurrency, res.decode_batch_size, res.decode_max_retries),
        threads=plan.threads,
        amp=run.amp,
        checkpoint_every_steps=run.checkpoint_every_steps,
        log_interval=run.log_interval,
        valid_interval=run.valid_interval,
        label_fingerprint=labels,
        config=config.to_dict(),
    )
    info = {
        "train": train_entries.num_rows,
        "valid": valid_entries.num_rows if valid_entries is not None else 0,
        "cached": cached,
        "steps": steps,
        "rejected": train_list.rejected + (valid_list.rejected if valid_list is not None else []),
    }
    return spec, info


def run_train(
    config: Config,
    save_dir: str,
    pretrain: str | None = None,
    label_file: str | None = None,
    run_name: str | None = None,
    train_fn=None,
) -> TrainSummary:
    """Fine-tunes TSN on ``TRAIN.filelist``, validating on ``VALID.filelist``; checkpoints go to
    ``save_dir/<run_name, train_run.run_name or TSN>``; rerunning with the same name resumes.
    ``label_file`` names the classes (recorded as the label set). Needs ``ray.init()``.
    ``train_fn`` replaces the worker function (tests wrap ``train_loop`` with it)."""
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
    spec, info = prepare(config, pretrain, where, label_fingerprint(names, config.model.num_classes))
    name = run_name or run.run_name or MODEL_NAME
    run_uri = checkpoint.run_uri(save_dir, name)
    fs, root = st.filesystem(run_uri, config.storage)
    if info["rejected"]:
        st.write_parquet(
            dead_letter_table(info["rejected"]), fs, f"{root}/{S.DEAD_LETTERS_DIR}/manifest-{time.time_ns()}.parquet"
        )
    log.info(
        "TSN fine-tune: %d workers (%s, %.2f CPUs each), %d x %d videos per step, %d steps per epoch, %d epochs -> %s",
        where.workers, "GPU" if where.use_gpu else "CPU", where.cpus_per_worker, where.workers, spec.batch_size,
        info["steps"], spec.epochs, st.redact(run_uri),
    )  # fmt: skip
    result = scaffold.fit(train_fn or _worker, spec, where, config, save_dir, name)
    dead = {v for f in st.list_files(fs, f"{root}/{S.DEAD_LETTERS_DIR}", ".parquet") for v in _ids(fs, f)}
    summary = TrainSummary(
        st.redact(run_uri),
        MODEL_NAME,
        workers=where.workers,
        device="gpu" if where.use_gpu else "cpu",
        steps_per_epoch=info["steps"],
        epochs=spec.epochs,
        train_videos=info["train"],
        valid_videos=info["valid"],
        cached=info["cached"],
        rejected=len(info["rejected"]),
        dead_letters=len(dead),
        best_metric=BEST_METRIC,
    )
    return scaffold.finish(result, summary, run_uri, config.storage, CURVES, start)


def _worker(config: dict[str, Any]) -> None:
    train_loop(config["spec"])


def _ids(fs, path: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[S.VIDEO_ID], filesystem=fs).column(S.VIDEO_ID).to_pylist()
