"""Fine-tuning AttentionLSTM on Ray Train: the driver (``run_train``) and the model's part in the
scaffold's one training loop (``LSTMTrainee``: build, optimizer, batches, step, validate).

The seed's recipe: centred RMSProp (rho 0.95, eps 1e-6), L2 decay TRAIN.weight_decay on every
parameter except the biases of rgb_fc, fc1, fc2 and output, the learning rate times decay_gamma
at each of decay_epochs, and sigmoid cross-entropy summed over classes and over the global batch
(the seed scaled its per-GPU sum by num_gpus before the gradient average). TRAIN.batch_size is the
global batch, split evenly across the workers, and a last partial batch is dropped, as the seed's
reader did.

Data: each worker reads its share of the epoch (``lstm_data.epoch_rows``: the table's row groups in
an order drawn from the seed and the epoch, a contiguous share per worker) through Ray Data read
tasks, then a seeded shuffle buffer (``train_run.shuffle_buffer``). The order and the dropout masks
(seeded per epoch, step and rank by the loop) depend only on train_run.seed, so a run resumed from
a checkpoint replays what the uninterrupted run would have done.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vtplatform import faults
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.eval.youtube8m import Youtube8mMetrics, batch_log_line, batch_metrics, seed_log_line
from vtplatform.labels import check_label_names, label_fingerprint, read_label_names
from vtplatform.lstm_data import FeatureInputs, cache_units, collate, epoch_rows, load_rows, read_inputs, unit_blocks
from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map, load_state, no_decay_keys
from vtplatform.models.weights import CheckpointMeta, WeightsError, read_weights
from vtplatform.stages.lstm import forward_logits, sigmoid_cross_entropy
from vtplatform.train import checkpoint, scaffold
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
class LSTMTrainee:
    """AttentionLSTM's part in ``scaffold.train_worker``; plain data, sent to every worker."""

    model: AttentionLSTMConfig
    storage: StorageSection
    pretrain: str | None
    learning_rates: tuple[float, tuple[int, ...], float]  # base rate, decay epochs, decay gamma
    weight_decay: float
    local_batch: int
    valid_batch: int
    shuffle_buffer: int
    top_k: int
    seed: int
    train: FeatureInputs
    valid: FeatureInputs | None
    task_cpus: float
    cache: dict[str, list | None] = field(default_factory=dict)  # phase -> refs of its rows in the object store
    best_metric: str = BEST_METRIC
    scalars: tuple[str, ...] = ("loss", "hit_at_one", "perr", "gap")

    def learning_rate(self, epoch: int, global_step: int) -> float:
        """Piecewise decay: the base rate times decay_gamma per decay epoch reached."""
        base, epochs, gamma = self.learning_rates
        return base * gamma ** sum(epoch >= e for e in epochs)

    def build(self, seed: int):
        model = build_model(self.model, seed=seed)
        return model, fluid_name_map(model)

    def optimizer(self, model):
        return make_optimizer(model, self.learning_rate(0, 0), self.weight_decay)

    def load_pretrained(self, model, chief: bool) -> None:
        if self.pretrain:
            summary = load_state(
                model, read_weights(self.pretrain, self.storage).state, st.redact(self.pretrain), self.seed
            )
            if chief:
                log.info("loaded %s (re-initialised: %s)", st.redact(self.pretrain), summary["reinitialised"] or "none")

    def batches(self, ctx, epoch: int, start_step: int):
        """This worker's batches of the epoch: its rows (``epoch_rows``) read in order, then a shuffle
        buffer seeded by (seed, epoch, rank); a resumed epoch reads again and skips its first steps."""
        rows = epoch_rows(self.train.rows, self.seed, epoch, ctx.rank, ctx.world_size)
        shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer or None}
        if self.shuffle_buffer:
            shuffle["local_shuffle_seed"] = scaffold.step_seed(self.seed, epoch, 0, ctx.rank)
        batches = scaffold.feed(
            unit_blocks(rows, self.train), self._loader("train"), self.local_batch, "numpy", drop_last=True, **shuffle
        )
        return itertools.islice(batches, start_step, None)

    def _loader(self, phase: str):
        inputs = self.train if phase == "train" else self.valid
        kwargs = {"table": inputs.table, "storage": self.storage, "num_classes": self.model.num_classes}
        kwargs["cache"] = self.cache.get(phase)
        return lambda ds: ds.map_batches(
            load_rows, batch_size=None, batch_format="pyarrow", num_cpus=self.task_cpus, fn_kwargs=kwargs
        )

    def step(self, net, optimizer, batch, amp: str, scaler) -> scaffold.Step:
        x, lengths, targets = collate(batch)
        per_video, logits = train_step(net, optimizer, x, lengths, targets, _world(), amp, scaler)
        probs = 1.0 / (1.0 + np.exp(-logits))
        figures = batch_metrics(probs, targets, self.top_k)
        return scaffold.Step(float(per_video.sum()), len(per_video), (float(per_video.mean()), *figures))

    def progress_line(self, epoch: int, step: int, steps: int, loss: float, scalars: dict[str, float]) -> str:
        info = f"[TRAIN {time.strftime('%Y-%m-%d %H:%M:%S')}] Epoch {epoch}, iter {step}/{steps}"
        return batch_log_line(info, loss, scalars["hit_at_one"], scalars["perr"], scalars["gap"])

    def validate(self, model) -> dict[str, float]:
        """Metrics over the whole validation set, in table order."""
        if self.valid is None:
            return {}
        metrics = Youtube8mMetrics(self.model.num_classes, self.top_k)
        blocks = unit_blocks(self.valid.rows, self.valid)
        for batch in scaffold.feed(blocks, self._loader("valid"), self.valid_batch, "numpy"):
            x, lengths, targets = collate(batch)
            logits = forward_logits(model, x, lengths)
            probs = 1.0 / (1.0 + np.exp(-logits))
            metrics.accumulate(probs, targets, sigmoid_cross_entropy(logits, targets).sum(axis=1))
        result = metrics.result()
        log.info("%s", seed_log_line(result, "[VALID] Finish"))
        return {f"valid_{k}": float(result[k]) for k in ("gap", "hit_at_one", "perr", "map", "avg_loss")}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        return {}


def _world() -> int:
    import paddle.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


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
    train_inputs = read_inputs(config, "train", config.train.filelist)
    valid_inputs = None
    if config.valid.filelist and config.train_run.valid_interval > 0:
        valid_inputs = read_inputs(config, "valid", config.valid.filelist)
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
    sizes = scaffold.place(config)
    trainee, loop = _spec(config, model_config, train_inputs, valid_inputs, pretrain, sizes, names)
    log.info(
        "training %s: %d videos, %d workers x batch %d, %d steps/epoch, %d epochs, on %s",
        run_name, len(train_inputs), sizes.workers, trainee.local_batch, loop.steps_per_epoch, loop.epochs,
        "GPU" if sizes.use_gpu else "CPU",
    )  # fmt: skip
    result = scaffold.fit(trainee, loop, sizes, config, save_dir, run_name)
    run = checkpoint.run_uri(save_dir, run_name)
    summary = TrainSummary(
        st.redact(run),
        MODEL_NAME,
        workers=sizes.workers,
        device="gpu" if sizes.use_gpu else "cpu",
        steps_per_epoch=loop.steps_per_epoch,
        epochs=loop.epochs,
        train_videos=len(train_inputs),
        valid_videos=len(valid_inputs or ()),
        skipped={
            k: train_inputs.skipped.get(k, 0) + (valid_inputs.skipped.get(k, 0) if valid_inputs else 0)
            for k in {**train_inputs.skipped, **(valid_inputs.skipped if valid_inputs else {})}
        },
        best_metric=BEST_METRIC,
    )
    return scaffold.finish(result, summary, run, config.storage, CURVES, start)


def _spec(
    config: Config,
    model: AttentionLSTMConfig,
    inputs: FeatureInputs,
    valid: FeatureInputs | None,
    pretrain: str | None,
    sizes,
    names: list[str] | None,
) -> tuple[LSTMTrainee, scaffold.LoopSpec]:
    train, run = config.train, config.train_run
    workers = sizes.workers
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
    cache = {"train": cache_units(inputs, config, sizes.task_cpus)}
    if valid is not None:
        cache["valid"] = cache_units(valid, config, sizes.task_cpus)
    trainee = LSTMTrainee(
        model=model,
        storage=config.storage,
        pretrain=pretrain,
        learning_rates=(train.learning_rate, tuple(train.decay_epochs), train.decay_gamma),
        weight_decay=train.weight_decay,
        local_batch=local,
        valid_batch=config.valid.batch_size,
        shuffle_buffer=run.shuffle_buffer,
        top_k=config.model.topk,
        seed=run.seed,
        train=inputs,
        valid=valid,
        task_cpus=sizes.task_cpus,
        cache=cache,
    )
    meta = CheckpointMeta(
        model_name=MODEL_NAME,
        model=asdict(model),
        num_classes=model.num_classes,
        config=config.to_dict(),
        best_metric=BEST_METRIC,
        steps_per_epoch=steps,
        num_workers=workers,
        label_fingerprint=label_fingerprint(names, model.num_classes),
        features=inputs.provenance,
    )
    loop = scaffold.LoopSpec(
        epochs=train.epoch,
        steps_per_epoch=steps,
        seed=run.seed,
        amp=run.amp,
        threads=sizes.threads,
        checkpoint_every_steps=run.checkpoint_every_steps,
        log_interval=run.log_interval,
        valid_interval=run.valid_interval if valid is not None else 0,
        meta=meta,
        fault=faults.train_fault(),
    )
    return trainee, loop


def _check_pretrain(model_config: AttentionLSTMConfig, pretrain: str, storage: StorageSection) -> None:
    """Loads the pretrained weights once in the driver, so a bad file fails before any worker starts."""
    try:
        load_state(build_model(model_config), read_weights(pretrain, storage).state, st.redact(pretrain))
    except WeightsError as exc:
        raise ConfigError(f"--pretrain {st.redact(pretrain)} does not fit the model: {exc}") from exc


# --- the model's step ------------------------------------------------------------------------------


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
