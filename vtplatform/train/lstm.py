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
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vtplatform import faults
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.eval.youtube8m import Youtube8mMetrics, batch_log_line, seed_log_line
from vtplatform.labels import check_label_names, label_fingerprint, read_label_names
from vtplatform.lstm_data import collate, make_dataset, plan_inputs
from vtplatform.memory import peak_rss_mb, private_rss_mb
from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map, load_state, no_decay_keys
from vtplatform.models.weights import CheckpointMeta, WeightsError, read_weights
from vtplatform.stages.lstm import forward_logits, sigmoid_cross_entropy
from vtplatform.train import checkpoint, scaffold
from vtplatform.train.backend import all_reduce_sum, check_replicas
from vtplatform.train.checkpoint import experiment_location
from vtplatform.train.scaffold import Curves, TrainSummary

log = logging.getLogger(__name__)

MODEL_NAME = S.MODEL_ATTENTION_LSTM
BEST_METRIC = "valid_gap"
CURVES = Curves(
    loss_label="loss (sum over classes, per video)",
    valid_loss="valid_avg_loss",
    quality=(("valid_gap", "valid GAP"), ("valid_hit_at_one", "valid Hit@1")),
    quality_title="validation GAP",
    quality_label="GAP",
)


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
    plan = scaffold.place(config)
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
    log.info(
        "training %s: %d videos, %d workers x batch %d, %d steps/epoch, %d epochs, on %s",
        run_name, len(train_inputs), workers, spec.local_batch, spec.steps_per_epoch, spec.epochs,
        "GPU" if use_gpu else "CPU",
    )  # fmt: skip
    data = _ray_data(config, train_inputs, valid_inputs, plan.task_cpus)
    result = scaffold.fit(train_loop, spec, plan, config, save_dir, run_name, **data)
    run = checkpoint.run_uri(save_dir, run_name)
    summary = TrainSummary(
        st.redact(run),
        MODEL_NAME,
        workers=workers,
        device="gpu" if use_gpu else "cpu",
        steps_per_epoch=spec.steps_per_epoch,
        epochs=spec.epochs,
        train_videos=len(train_inputs),
        valid_videos=len(valid_inputs or ()),
        skipped={
            k: train_inputs.skipped.get(k, 0) + (valid_inputs.skipped.get(k, 0) if valid_inputs else 0)
            for k in {**train_inputs.skipped, **(valid_inputs.skipped if valid_inputs else {})}
        },
        best_metric=BEST_METRIC,
    )
    return scaffold.finish(result, summary, run, config.storage, CURVES, start)


def _ray_data(config: Config, train_inputs, valid_inputs, task_cpus: float) -> dict[str, Any]:
    """The Ray Datasets of the training features (in a seeded block order, split over the
    workers in order) and of the validation ones, as ``datasets`` and ``dataset_config``."""
    from ray.train import DataConfig

    datasets = {
        "train": make_dataset(train_inputs, config, cache=True, task_cpus=task_cpus).randomize_block_order(
            seed=config.train_run.seed
        )
    }
    if valid_inputs is not None:
        datasets["valid"] = make_dataset(valid_inputs, config, cache=True, task_cpus=task_cpus)
    for ds in datasets.values():
        ds.context.enable_progress_bars = False  # the workers' logs carry the progress
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # with the seeded block order: the same rows reach the same worker in every run
    split = DataConfig(datasets_to_split=["train"], execution_options=ingest, enable_shard_locality=False)
    return {"datasets": datasets, "dataset_config": split}


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
    try:
        load_state(build_model(model_config), read_weights(pretrain, storage).state, st.redact(pretrain))
    except WeightsError as exc:
        raise ConfigError(f"--pretrain {st.redact(pretrain)} does not fit the model: {exc}") from exc


# --- worker ----------------------------------------------------------------------------------


def make_optimizer(model, learning_rate: float, weight_decay: float):
    """Centred RMSProp with L2 decay, the seed's biases exempt."""
    import paddle

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

    spec: TrainSpec = loop_config["spec"]
    ctx = scaffold.start_worker(spec.threads)
    model = build_model(spec.model, seed=spec.seed)
    name_map = fluid_name_map(model)
    optimizer = make_optimizer(model, spec.lr_at(0), spec.weight_decay)
    resumed, state = scaffold.resume(ctx, model, optimizer, name_map, spec.epochs)
    if resumed is None and spec.pretrain:
        _load_pretrained(model, spec, ctx.is_chief)
    resumed_sums = _resumed_epoch(resumed, state, spec, ctx.is_chief)
    net = paddle.DataParallel(model) if ctx.world_size > 1 else model
    scaler = scaffold.make_scaler(spec.amp)
    shard = ray.train.get_dataset_shard("train")
    valid = ray.train.get_dataset_shard("valid") if ctx.is_chief and spec.valid_interval > 0 else None
    record = scaffold.Recorder(ctx, model, optimizer, name_map, checkpoint_meta(spec))
    first_epoch = state.epoch
    for epoch in range(state.epoch, spec.epochs):
        optimizer.set_lr(spec.lr_at(epoch))
        model.train()
        skip = state.step
        loss_sum, seen = resumed_sums if resumed_sums and epoch == first_epoch else (0.0, 0)
        started, private_peak = time.perf_counter(), private_rss_mb()
        if ctx.is_chief:
            log.info(
                "------- epoch %d: learning rate %g, %d steps -------", epoch, spec.lr_at(epoch), spec.steps_per_epoch
            )
        for step, batch in enumerate(_batches(shard, spec, epoch, ctx.rank)):
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
                _log_step(record, spec, epoch, step, state.global_step, per_video, logits, targets)
            every = spec.checkpoint_every_steps
            if every and state.step % every == 0 and state.step < spec.steps_per_epoch:
                partial = all_reduce_sum(np.array([loss_sum, seen]), ctx.world_size)  # (loss sum, videos) so far
                mid = {"epoch": epoch, "step": state.step, "global_step": state.global_step}
                record.report(state, mid, epoch_partial=partial.tolist())
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
        best = record.end_epoch(state, metrics, BEST_METRIC)  # only the chief validates: only it finds a best
        record.report(state, metrics, best=best)
    record.close()


def checkpoint_meta(spec: TrainSpec) -> CheckpointMeta:
    """What every checkpoint of the run records besides where the run stands."""
    return CheckpointMeta(
        model_name=MODEL_NAME,
        model=asdict(spec.model),
        num_classes=spec.model.num_classes,
        config=spec.config,
        best_metric=BEST_METRIC,
        steps_per_epoch=spec.steps_per_epoch,
        num_workers=spec.num_workers,
        label_fingerprint=spec.label_fingerprint,
        features=spec.features,
    )


def _load_pretrained(model, spec: TrainSpec, chief: bool) -> None:
    summary = load_state(model, read_weights(spec.pretrain, spec.storage).state, st.redact(spec.pretrain), spec.seed)
    if chief:
        log.info("loaded %s (re-initialised: %s)", st.redact(spec.pretrain), summary["reinitialised"] or "none")


def _resumed_epoch(resumed: CheckpointMeta | None, state, spec: TrainSpec, chief: bool) -> tuple[float, int] | None:
    """The chief's (loss sum, videos) of the epoch a mid-epoch checkpoint left part-done (summed
    over the workers); None elsewhere and when the run starts an epoch afresh. A run resumed with
    another batch layout restarts that epoch (on every worker)."""
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
    return resumed.epoch_partial if chief else None


def _batches(shard, spec: TrainSpec, epoch: int, rank: int):
    """This worker's batches of an epoch: the seeded block order, then a seeded shuffle buffer."""
    return shard.iter_batches(
        batch_size=spec.local_batch,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=spec.shuffle_buffer or None,
        local_shuffle_seed=_step_seed(spec, epoch, 0, rank) if spec.shuffle_buffer else None,
    )


def _log_step(record, spec: TrainSpec, epoch: int, step: int, global_step: int, per_video, logits, targets) -> None:
    """The seed's progress line, and the step's loss and rate in TensorBoard."""
    probs = 1.0 / (1.0 + np.exp(-logits))
    info = f"[TRAIN {time.strftime('%Y-%m-%d %H:%M:%S')}] Epoch {epoch}, iter {step}/{spec.steps_per_epoch}"
    log.info("%s", batch_log_line(info, float(per_video.mean()), probs, targets, spec.top_k))
    record.scalar("train/loss", float(per_video.mean()), global_step)
    record.scalar("train/lr", spec.lr_at(epoch), global_step)


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

    with scaffold.autocast(amp):
        logits = net(paddle.to_tensor(x), paddle.to_tensor(lengths))
    per_video = F.binary_cross_entropy_with_logits(
        logits.astype("float32"), paddle.to_tensor(targets), reduction="none"
    ).sum(axis=-1)
    loss = per_video.sum() * float(world_size)  # gradients are averaged over workers: this sums the global batch
    scaffold.optimizer_step(optimizer, loss, scaler)
    return per_video.numpy(), logits.astype("float32").numpy()


def _validate(model, valid, spec: TrainSpec) -> dict[str, float]:
    """Metrics over the whole validation set, on the chief worker."""
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

    fs, root = experiment_location()
    marker = f"{root}/_fault_injected_{target_rank}_{target_step}"
    if st.exists(fs, marker):
        return
    st.write_bytes(b"", fs, marker)
    raise RuntimeError(f"injected fault on worker {rank} at step {global_step} ({faults.TRAIN_ENV})")
