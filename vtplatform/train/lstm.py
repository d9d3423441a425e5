"""Fine-tuning AttentionLSTM on Ray Train: the driver (``run_train``) and the worker loop.

The seed's recipe: centred RMSProp (rho 0.95, eps 1e-6), L2 decay TRAIN.weight_decay on every
parameter except the biases of rgb_fc, fc1, fc2 and output, the learning rate times decay_gamma
at each of decay_epochs, and sigmoid cross-entropy summed over classes and over the global batch
(the seed scaled its per-GPU sum by num_gpus before the gradient average). TRAIN.batch_size is the
global batch, split evenly across the workers, and a last partial batch is dropped, as the seed's
reader did.

Determinism: the data order (a seeded block order, then a seeded shuffle buffer per worker and
epoch) and the dropout masks (seeded per epoch, step and rank) depend only on train_run.seed,
so a run resumed from a checkpoint replays what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vtplatform import faults
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.models.attention_lstm import AttentionLSTMConfig

log = logging.getLogger(__name__)

MODEL_NAME = "AttentionLSTM"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class TrainSpec:
    """What every worker needs; plain data (Ray Datasets travel separately)."""

    model: AttentionLSTMConfig
    config: dict[str, Any]
    storage: StorageSection
    pretrain: str | None
    epochs: int
    learning_rate: float
    decay_epochs: tuple[int, ...]
    decay_gamma: float
    weight_decay: float
    local_batch: int
    valid_batch: int
    steps_per_epoch: int
    num_workers: int
    use_gpu: bool
    amp: str
    seed: int
    checkpoint_every_steps: int
    log_interval: int
    valid_interval: int
    shuffle_buffer: int
    threads: int
    top_k: int
    label_fingerprint: str
    features: dict[str, Any] | None
    fault: tuple[int, int] | None = None  # (rank, global step): the driver's VTP_FAULT_INJECT drill

    def lr_at(self, epoch: int) -> float:
        """Piecewise decay: the base rate times decay_gamma per decay epoch reached."""
        return self.learning_rate * self.decay_gamma ** sum(epoch >= e for e in self.decay_epochs)


@dataclass
class TrainSummary:
    run: str
    epochs_done: int = 0
    global_step: int = 0
    train_videos: int = 0
    valid_videos: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    best_valid_gap: float | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    device: str = "cpu"
    elapsed_seconds: float = 0.0

    def format(self) -> str:
        best = (
            "n/a (no validation set)" if self.best_valid_gap is None else f"{self.best_valid_gap:.4f} ({self.run}/best)"
        )
        lines = [
            "training summary",
            f"  run               {self.run}",
            f"  workers           {self.workers} on {self.device}",
            f"  videos            {self.train_videos} train, {self.valid_videos} valid",
        ]
        lines += [f"  skipped           {n} {reason}" for reason, n in sorted(self.skipped.items())]
        lines += [
            f"  epochs done       {self.epochs_done} ({self.global_step} steps)",
            "  last epoch        "
            + ", ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items() if isinstance(v, float)),
            f"  best valid GAP    {best}",
            f"  curves            {self.run}/{CURVES_FILE}, TensorBoard: {self.run}/{TENSORBOARD_DIR}",
            f"  wall time         {self.elapsed_seconds:.1f} s",
        ]
        return "\n".join(lines)


# --- driver ----------------------------------------------------------------------------------


def run_train(
    config: Config,
    save_dir: str,
    pretrain: str | None = None,
    label_file: str | None = None,
    run_name: str | None = None,
) -> TrainSummary:
    """Fine-tunes AttentionLSTM on Ray Train into ``save_dir/<run name>``; rerunning with the
    same run name and ``save_dir`` resumes from the last checkpoint. Needs ``ray.init()``."""
    from ray.train import DataConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from vtplatform import resources as R
    from vtplatform.labels import check_label_names, label_fingerprint, read_label_names
    from vtplatform.lstm_data import make_dataset, plan_inputs
    from vtplatform.train import checkpoint
    from vtplatform.train.backend import PaddleBackendConfig

    start = time.perf_counter()
    run_name = run_name or config.train_run.run_name or MODEL_NAME
    train_inputs = plan_inputs(config, "train", config.train.filelist)
    valid_inputs = None
    if config.valid.filelist and config.train_run.valid_interval > 0:
        valid_inputs = plan_inputs(config, "valid", config.valid.filelist)
    model_config = AttentionLSTMConfig.from_model_section(config.model, train_inputs.feature_dim)
    if model_config.feature_dim != config.model.feature_dims[0]:
        log.info(
            "features are %d-dim (from %s); MODEL.feature_dims %s is not used",
            model_config.feature_dim,
            st.redact(train_inputs.source),
            list(config.model.feature_dims),
        )
    names = read_label_names(label_file, config.storage) if label_file else None
    if names is not None:
        check_label_names(names, model_config.num_classes, label_file)
    if pretrain:
        _check_pretrain(model_config, pretrain, config.storage)
    plan = R.size_training(config, config.train.use_gpu)
    workers, use_gpu = plan.workers, plan.use_gpu
    spec = _spec(
        config,
        model_config,
        train_inputs,
        pretrain,
        plan,
        label_fingerprint(names, model_config.num_classes),
    )
    if valid_inputs is None:
        spec = dataclasses.replace(spec, valid_interval=0)
    datasets = {
        "train": make_dataset(train_inputs, config, cache=True, task_cpus=plan.task_cpus).randomize_block_order(
            seed=config.train_run.seed
        )
    }
    if valid_inputs is not None:
        datasets["valid"] = make_dataset(valid_inputs, config, cache=True, task_cpus=plan.task_cpus)
    for ds in datasets.values():
        ds.context.enable_progress_bars = False  # the workers' logs carry the progress
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # with the seeded block order: the same rows reach the same worker in every run
    trainer = DataParallelTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        backend_config=PaddleBackendConfig(),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=plan.worker_resources()
        ),
        run_config=checkpoint.run_config(
            save_dir, run_name, config.storage, config.train_run.keep_checkpoints, config.train_run.max_failures
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest, enable_shard_locality=False),
    )
    log.info(
        "training %s: %d videos, %d workers x batch %d, %d steps/epoch, %d epochs, on %s",
        run_name, len(train_inputs), workers, spec.local_batch, spec.steps_per_epoch, spec.epochs,
        "GPU" if use_gpu else "CPU",
    )  # fmt: skip
    result = trainer.fit()
    run = checkpoint.run_uri(save_dir, run_name)
    summary = TrainSummary(
        st.redact(run),
        train_videos=len(train_inputs),
        valid_videos=len(valid_inputs or ()),
        workers=workers,
        device="gpu" if use_gpu else "cpu",
    )
    summary.skipped = {
        k: train_inputs.skipped.get(k, 0) + (valid_inputs.skipped.get(k, 0) if valid_inputs else 0)
        for k in {**train_inputs.skipped, **(valid_inputs.skipped if valid_inputs else {})}
    }
    if result.checkpoint is not None:
        with (
            result.checkpoint.as_directory() as directory,
            open(os.path.join(directory, checkpoint.META_FILE), "rb") as f,
        ):
            meta = json.loads(f.read())
        summary.epochs_done, summary.global_step, summary.best_valid_gap = (
            meta["epoch"],
            meta["global_step"],
            meta.get("best"),
        )
        summary.last_metrics = meta["history"][-1] if meta["history"] else {}
        write_curves(meta["history"], run, config.storage)
    summary.elapsed_seconds = time.perf_counter() - start
    return summary


def _spec(
    config: Config,
    model: AttentionLSTMConfig,
    inputs,
    pretrain: str | None,
    plan,
    labels: str,
) -> TrainSpec:
    train, run = config.train, config.train_run
    workers, use_gpu = plan.workers, plan.use_gpu
    local = train.batch_size // workers
    if local == 0:
        raise ConfigError(
            f"TRAIN.batch_size {train.batch_size} is smaller than the {workers} workers it is split across"
        )
    steps = (len(inputs) // workers) // local
    if steps == 0:
        raise ConfigError(
            f"{len(inputs)} training videos make no full batch of {local} per worker on {workers} workers: "
            "the number of training samples must exceed TRAIN.batch_size"
        )
    if run.amp != "none" and not use_gpu:
        raise ConfigError(
            f"train_run.amp={run.amp} needs GPUs; none are used "
            "(resources.use_gpu, TRAIN.use_gpu, or no GPU in the cluster)"
        )
    return TrainSpec(
        model=model,
        config=config.to_dict(),
        storage=config.storage,
        pretrain=pretrain,
        epochs=train.epoch,
        learning_rate=train.learning_rate,
        decay_epochs=tuple(train.decay_epochs),
        decay_gamma=train.decay_gamma,
        weight_decay=train.weight_decay,
        local_batch=local,
        valid_batch=config.valid.batch_size,
        steps_per_epoch=steps,
        num_workers=workers,
        use_gpu=use_gpu,
        amp=run.amp,
        seed=run.seed,
        checkpoint_every_steps=run.checkpoint_every_steps,
        log_interval=run.log_interval,
        valid_interval=run.valid_interval,
        shuffle_buffer=run.shuffle_buffer,
        threads=plan.threads,
        top_k=config.model.topk,
        label_fingerprint=labels,
        features=inputs.provenance,
        fault=faults.train_fault(),
    )


def _check_pretrain(model_config: AttentionLSTMConfig, pretrain: str, storage: StorageSection) -> None:
    """Loads the pretrained weights once in the driver, so a bad file fails before any worker starts."""
    from vtplatform.models.attention_lstm import build_model, load_state
    from vtplatform.models.weights import WeightsError, read_weights

    try:
        load_state(build_model(model_config), read_weights(pretrain, storage).state, st.redact(pretrain))
    except WeightsError as exc:
        raise ConfigError(f"--pretrain {st.redact(pretrain)} does not fit the model: {exc}") from exc


# --- worker ----------------------------------------------------------------------------------


def _setup_worker_logging() -> None:
    """Our INFO lines reach the driver's console (Ray forwards worker stderr)."""
    logger = logging.getLogger("vtplatform")
    logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def make_optimizer(model, learning_rate: float, weight_decay: float):
    """Centred RMSProp with L2 decay, the seed's biases exempt."""
    import paddle

    from vtplatform.models.attention_lstm import no_decay_keys

    exempt = no_decay_keys()
    for key, param in model.named_parameters():
        if key in exempt:
            param.regularizer = paddle.regularizer.L2Decay(0.0)
    return paddle.optimizer.RMSProp(
        learning_rate=learning_rate,
        rho=0.95,
        epsilon=1e-6,
        momentum=0.0,
        centered=True,
        parameters=model.parameters(),
        weight_decay=paddle.regularizer.L2Decay(weight_decay),
    )


def _step_seed(spec: TrainSpec, epoch: int, step: int, rank: int) -> int:
    return (spec.seed * 1_000_003 + epoch * 10_007 + step * 101 + rank) % (2**31 - 1)


def train_loop(loop_config: dict[str, Any]) -> None:
    """One worker of the fine-tune (runs inside Ray Train)."""
    import paddle
    import ray.train

    from vtplatform.eval.youtube8m import batch_log_line
    from vtplatform.lstm_data import collate
    from vtplatform.models.attention_lstm import build_model, fluid_name_map, load_state
    from vtplatform.pipeline import peak_rss_mb, private_rss_mb
    from vtplatform.train import checkpoint
    from vtplatform.train.backend import all_reduce_sum, check_replicas, setup_paddle

    _setup_worker_logging()
    spec: TrainSpec = loop_config["spec"]
    ctx = setup_paddle(None if spec.use_gpu else spec.threads)
    model = build_model(spec.model, seed=spec.seed)
    name_map = fluid_name_map(model)
    optimizer = make_optimizer(model, spec.lr_at(0), spec.weight_decay)
    meta = checkpoint.restore(model, optimizer, name_map)
    if meta is None and spec.pretrain:
        from vtplatform.models.weights import read_weights

        summary = load_state(
            model, read_weights(spec.pretrain, spec.storage).state, st.redact(spec.pretrain), spec.seed
        )
        if ctx.is_chief:
            log.info("loaded %s (re-initialised: %s)", st.redact(spec.pretrain), summary["reinitialised"] or "none")
    state = checkpoint.TrainState.from_meta(meta)
    if meta and state.step and meta.get("steps_per_epoch") != spec.steps_per_epoch:
        log.warning(
            "the run resumed with a different batch layout (%s -> %s steps/epoch): epoch %d restarts",
            meta.get("steps_per_epoch"),
            spec.steps_per_epoch,
            state.epoch,
        )
        state.step = 0
    net = paddle.DataParallel(model) if ctx.world_size > 1 else model
    scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**15) if spec.amp == "float16" else None
    shard = ray.train.get_dataset_shard("train")
    valid = ray.train.get_dataset_shard("valid") if ctx.is_chief and spec.valid_interval > 0 else None
    board = _Board(ctx.is_chief)

    def report(metrics: dict[str, Any], best: bool = False, partial: np.ndarray | None = None) -> None:
        meta_out = {
            **state.to_meta(),
            "epoch_partial": None if partial is None else partial.tolist(),  # (loss sum, videos) of a part-done epoch
            "model_name": MODEL_NAME,
            "model": asdict(spec.model),
            "config": spec.config,
            "metrics": metrics,
            "label_fingerprint": spec.label_fingerprint,
            "features": spec.features,
            "steps_per_epoch": spec.steps_per_epoch,
            "num_workers": spec.num_workers,
        }
        name = checkpoint.dir_name(state.epoch, state.step)
        checkpoint.report(
            metrics,
            rank=ctx.rank,
            model=model,
            optimizer=optimizer,
            name_map=name_map,
            meta=meta_out,
            dir_name=name,
            best=best,
        )
        board.upload()

    if state.epoch >= spec.epochs and ctx.is_chief:
        log.info(
            "the run already finished its %d epochs; raise TRAIN.epoch to go on, or pass another --run_name",
            spec.epochs,
        )
    first_epoch = state.epoch
    resumed = (meta or {}).get("epoch_partial") if state.step and ctx.is_chief else None
    for epoch in range(state.epoch, spec.epochs):
        optimizer.set_lr(spec.lr_at(epoch))
        model.train()
        skip = state.step
        loss_sum, seen = resumed if resumed and epoch == first_epoch else (0.0, 0)
        started, private_peak = time.perf_counter(), private_rss_mb()
        if ctx.is_chief:
            log.info(
                "------- epoch %d: learning rate %g, %d steps -------", epoch, spec.lr_at(epoch), spec.steps_per_epoch
            )
        batches = shard.iter_batches(
            batch_size=spec.local_batch,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=spec.shuffle_buffer or None,
            local_shuffle_seed=_step_seed(spec, epoch, 0, ctx.rank) if spec.shuffle_buffer else None,
        )
        for step, batch in enumerate(batches):
            if step >= spec.steps_per_epoch:
                break
            if step < skip:
                continue  # replaying the data order of a resumed epoch
            _maybe_inject_fault(spec.fault, ctx.rank, state.global_step)
            paddle.seed(_step_seed(spec, epoch, step, ctx.rank))
            x, lengths, targets = collate(batch)
            per_video, logits = train_step(net, optimizer, x, lengths, targets, ctx.world_size, spec.amp, scaler)
            loss_sum += float(per_video.sum())
            seen += len(per_video)
            state.step, state.global_step = step + 1, state.global_step + 1
            private_peak = max(private_peak, private_rss_mb())  # sampled while the batch is in hand
            if ctx.is_chief and (step % spec.log_interval == 0 or step + 1 == spec.steps_per_epoch):
                probs = 1.0 / (1.0 + np.exp(-logits))
                info = f"[TRAIN {time.strftime('%Y-%m-%d %H:%M:%S')}] Epoch {epoch}, iter {step}/{spec.steps_per_epoch}"
                log.info("%s", batch_log_line(info, float(per_video.mean()), probs, targets, spec.top_k))
                board.scalar("train/loss", float(per_video.mean()), state.global_step)
                board.scalar("train/lr", spec.lr_at(epoch), state.global_step)
            every = spec.checkpoint_every_steps
            if every and state.step % every == 0 and state.step < spec.steps_per_epoch:
                partial = all_reduce_sum(np.array([loss_sum, seen]), ctx.world_size)
                report({"epoch": epoch, "step": state.step, "global_step": state.global_step}, partial=partial)
        totals = all_reduce_sum(np.array([loss_sum, seen]), ctx.world_size)
        check_replicas(model, ctx.world_size)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "global_step": state.global_step,
            "train_loss": float(totals[0] / max(totals[1], 1)),
            "epoch_seconds": time.perf_counter() - started,  # of this process: a resumed epoch's remainder
            "worker_peak_mb": peak_rss_mb(),  # the chief's peak resident memory so far (VmHWM)
            "worker_private_peak_mb": private_peak,  # its own memory at its highest step this epoch
        }
        if ctx.is_chief:
            log.info(
                "[TRAIN] Epoch %d training finished, %.1f s, loss %.6f",
                epoch,
                metrics["epoch_seconds"],
                metrics["train_loss"],
            )
        if valid is not None and (epoch + 1) % spec.valid_interval == 0:
            metrics.update(_validate(model, valid, spec))
        state.epoch, state.step = epoch + 1, 0
        best = False
        if ctx.is_chief and "valid_gap" in metrics and (state.best is None or metrics["valid_gap"] > state.best):
            state.best, best = metrics["valid_gap"], True
        state.history.append(metrics)
        for key, value in metrics.items():
            if key not in ("epoch", "global_step"):
                board.scalar(f"epoch/{key}", value, epoch)
        report(metrics, best=best)
    board.close()


def train_step(
    net,
    optimizer,
    x: np.ndarray,
    lengths: np.ndarray,
    targets: np.ndarray,
    world_size: int,
    amp: str = "none",
    scaler=None,
):
    """One step of the seed's loss: sigmoid cross-entropy summed over classes and the global batch.
    Returns the per-video losses and the logits (numpy)."""
    import paddle
    import paddle.nn.functional as F

    with paddle.amp.auto_cast(enable=amp != "none", dtype=amp if amp != "none" else "float16", level="O1"):
        logits = net(paddle.to_tensor(x), paddle.to_tensor(lengths))
    per_video = F.binary_cross_entropy_with_logits(
        logits.astype("float32"), paddle.to_tensor(targets), reduction="none"
    ).sum(axis=-1)
    loss = per_video.sum() * float(world_size)  # gradients are averaged over workers: this sums the global batch
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    optimizer.clear_grad()
    return per_video.numpy(), logits.astype("float32").numpy()


def _validate(model, valid, spec: TrainSpec) -> dict[str, float]:
    """Metrics over the whole validation set, on the chief worker."""
    from vtplatform.eval.youtube8m import Youtube8mMetrics, seed_log_line
    from vtplatform.lstm_data import collate
    from vtplatform.stages.lstm import forward_logits, sigmoid_cross_entropy

    model.eval()
    metrics = Youtube8mMetrics(spec.model.num_classes, spec.top_k)
    for batch in valid.iter_batches(batch_size=spec.valid_batch, batch_format="numpy"):
        x, lengths, targets = collate(batch)
        logits = forward_logits(model, x, lengths)
        metrics.accumulate(1.0 / (1.0 + np.exp(-logits)), targets, sigmoid_cross_entropy(logits, targets).sum(axis=1))
    model.train()
    result = metrics.result()
    log.info("%s", seed_log_line(result, "[VALID] Finish"))
    return {f"valid_{k}": float(result[k]) for k in ("gap", "hit_at_one", "perr", "map", "avg_loss")}


def _maybe_inject_fault(fault: tuple[int, int] | None, rank: int, global_step: int) -> None:
    """``VTP_FAULT_INJECT=RANK:STEP`` in the driver's environment makes that worker raise once at
    that step of the run (a marker in the run folder keeps the restarted worker from raising again)."""
    if fault is None:
        return
    target_rank, target_step = fault
    if rank != target_rank or global_step != target_step:
        return
    from vtplatform.train.checkpoint import experiment_location

    fs, root = experiment_location()
    marker = f"{root}/_fault_injected_{target_rank}_{target_step}"
    if st.exists(fs, marker):
        return
    st.write_bytes(b"", fs, marker)
    raise RuntimeError(f"injected fault on worker {rank} at step {global_step} ({faults.TRAIN_ENV})")


class _Board:
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
        from vtplatform.train.checkpoint import write_run_file

        self.writer.flush()
        for name in os.listdir(self.dir):
            with open(os.path.join(self.dir, name), "rb") as f:
                write_run_file(f"{TENSORBOARD_DIR}/{name}", f.read())

    def close(self) -> None:
        if self.writer is not None:
            self.upload()
            self.writer.close()


# --- after training --------------------------------------------------------------------------


def write_curves(history: list[dict[str, Any]], run: str, storage: StorageSection) -> None:
    """RUN/curves.png (loss and GAP per epoch) and RUN/history.json."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, root = st.filesystem(run, storage)
    st.write_bytes(json.dumps(history, indent=1).encode(), fs, f"{root}/{HISTORY_FILE}")
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_gap) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    valid = [h for h in history if "valid_avg_loss" in h]
    if valid:
        ax_loss.plot([h["epoch"] for h in valid], [h["valid_avg_loss"] for h in valid], marker="o", label="valid")
        ax_gap.plot(
            [h["epoch"] for h in valid],
            [h["valid_gap"] for h in valid],
            marker="o",
            color="tab:green",
            label="valid GAP",
        )
        ax_gap.plot(
            [h["epoch"] for h in valid],
            [h["valid_hit_at_one"] for h in valid],
            marker=".",
            color="tab:gray",
            label="valid Hit@1",
        )
    ax_loss.set(xlabel="epoch", ylabel="loss (sum over classes, per video)", title="loss")
    ax_gap.set(xlabel="epoch", ylabel="GAP", title="validation GAP", ylim=(0, 1))
    for ax in (ax_loss, ax_gap):
        if ax.get_legend_handles_labels()[0]:  # no validation: the GAP panel stays empty
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    st.write_bytes(buf.getvalue(), fs, f"{root}/{CURVES_FILE}")
