"""The AttentionLSTM stage: features -> class probabilities, on an actor pool that declares its
own resources from the config (``resources.lstm_*`` when tagging, ``resources.train_*`` when evaluating and
predicting); and resolving the model a checkpoint describes.

``LSTMStage`` takes numpy batches of a feature table (evaluation, prediction); ``TagStage`` takes
the TSN stage's Arrow rows (tagging) and adds top-k ids, probabilities and the labels at or
above the threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.labels import top_k_indices
from vtplatform.lstm_data import collate
from vtplatform.memory import ActorMemory
from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, load_state
from vtplatform.models.lstm_numpy import NumpyAttentionLSTM
from vtplatform.models.weights import read_weights

log = logging.getLogger(__name__)

MODEL_NAME = S.MODEL_ATTENTION_LSTM


def tag_need(config: Config) -> R.ModelNeed:
    """The tagging actors' resources, from ``resources.lstm_*``."""
    res = config.resources
    return R.ModelNeed(
        MODEL_NAME,
        res.lstm_cpus,
        res.lstm_gpus,
        res.lstm_actors,
        res.lstm_threads,
        "resources.lstm_cpus",
        "resources.lstm_gpus",
    )


def inference_need(config: Config) -> R.ModelNeed:
    """AttentionLSTM evaluation and prediction: as many actors as training workers
    (``resources.train_*``), 1 GPU each on GPUs."""
    res = config.resources
    return R.ModelNeed(
        MODEL_NAME,
        res.train_cpus or 1.0,
        1.0,
        res.train_workers or 1,
        res.train_threads,
        "resources.train_cpus",
        "resources.train_workers",
    )


@dataclass(frozen=True)
class ModelSpec:
    """Everything an inference actor needs to build and load the model."""

    model: AttentionLSTMConfig
    weights: str
    storage: StorageSection
    use_gpu: bool = False
    threads: int = 1


def resolve_model(config: Config, weights: str, feature_dim: int):
    """(AttentionLSTMConfig, LoadedWeights): the checkpoint's own dims when it records them,
    else the config's (with ``feature_dim`` from the features)."""
    loaded = read_weights(weights, config.storage).require(MODEL_NAME)
    from_config = AttentionLSTMConfig.from_model_section(config.model, feature_dim)
    recorded = (loaded.meta or {}).get("model")
    if recorded:
        model_config = AttentionLSTMConfig(**recorded)
        if model_config != from_config:
            log.info("using the checkpoint's model dimensions %s (the config says %s)", model_config, from_config)
    else:
        model_config = from_config
        classes = loaded.state.get("output.w_0")
        if classes is not None and classes.shape[-1] != model_config.num_classes:
            raise ConfigError(
                f"{st.redact(weights)} predicts {classes.shape[-1]} classes, "
                f"MODEL.num_classes is {model_config.num_classes}"
            )
    if model_config.feature_dim != feature_dim:
        raise ConfigError(f"the model takes {model_config.feature_dim}-dim features, the inputs have {feature_dim}")
    return model_config, loaded


def check_feature_provenance(config: Config, meta: dict | None, provenance: dict | None, source: str) -> None:
    """Refuses features made differently from those the checkpoint was trained on."""
    trained = (meta or {}).get("features")
    if not config.data.check_provenance or not trained or provenance is None:
        if trained and provenance is None:
            log.warning(
                "cannot check that %s match the features the model was trained on (no provenance)", st.redact(source)
            )
        return
    diff = S.signature_diff(trained, provenance)
    if diff:
        raise ConfigError(
            f"{st.redact(source)} were made differently from the features the model was trained on: {'; '.join(diff)} "
            "(set -o data.check_provenance=false to override)"
        )


class LSTMStage:
    """Ray Data stage: loads the model once, then numpy batches -> probabilities.

    ``top_k`` set: ``class_ids``/``probs`` (N, k); unset: ``probs`` (N, C) plus per-video ``loss``
    (sigmoid cross-entropy summed over classes) when the batch has targets.
    """

    def __init__(self, spec: ModelSpec, top_k: int | None):
        self.logits = inference_model(spec)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, lengths, targets = collate(batch)
        logits = self.logits(x, lengths)
        probs = 1.0 / (1.0 + np.exp(-logits))
        out = {S.VIDEO_ID: batch[S.VIDEO_ID]}
        if self.top_k is not None:
            top = top_k_indices(probs, self.top_k)
            out[S.CLASS_IDS] = top.astype(np.int32)
            out[S.PROBS] = np.take_along_axis(probs, top, axis=1).astype(np.float32)
        else:
            out[S.PROBS] = probs.astype(np.float32)
            if targets is not None:
                out[S.TARGETS] = targets.astype(np.uint8)
                out[S.LOSS] = sigmoid_cross_entropy(logits, targets).sum(axis=1)
        return out


def inference_model(spec: ModelSpec) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The loaded model as ``(x (B, T, D), lengths (B,)) -> logits (B, C)`` float64: on CPU the numpy
    engine (``models/lstm_numpy.py``, a few times Paddle's CPU rate, the same numbers up to float32
    rounding) on ``spec.threads`` BLAS threads; on GPU, or with ``MODEL.lstm_kernel`` other than
    auto, the Paddle model."""
    import paddle

    paddle.set_device("gpu" if spec.use_gpu else "cpu")
    if not spec.use_gpu:
        paddle.base.core.set_num_threads(spec.threads)
    model = build_model(spec.model)
    model.eval()
    load_state(model, read_weights(spec.weights, spec.storage).state, spec.weights)
    if spec.use_gpu or spec.model.lstm_kernel != "auto":
        return lambda x, lengths: forward_logits(model, x, lengths)
    from threadpoolctl import threadpool_limits

    threadpool_limits(spec.threads, user_api="blas")  # this actor's share of the CPUs, as Paddle's threads above
    return NumpyAttentionLSTM.from_model(model).logits


def forward_logits(model, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    import paddle

    with paddle.no_grad():
        return model(paddle.to_tensor(x), paddle.to_tensor(lengths)).numpy().astype(np.float64)


def sigmoid_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Element-wise, in the numerically stable form max(x, 0) - x*z + log(1 + exp(-|x|))."""
    return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


@dataclass(frozen=True)
class TagSpec:
    """What an AttentionLSTM tagging actor needs."""

    lstm: ModelSpec
    top_k: int
    threshold: float
    feature_dtype: str
    num_segments: int
    feature_dim: int
    keep_features: bool


class TagStage:
    """Features (as bytes, from the TSN stage) -> tags, by each row's kind (``schema.ROW_KIND``): a
    video row gets its top-k class ids and probabilities and the classes at or above the threshold
    (``VIDEO_TAG_FIELDS``); a timeline chunk row gets the same for each of its windows
    (``WINDOW_TAG_FIELDS``), the AttentionLSTM run over the window's frames. Rows that failed earlier
    pass through untouched. A video goes through
    the model alone (the results of a batched call change in the last bits with its other rows), so
    its tags are the same whatever shares its batch: with or without segments, or in another run."""

    def __init__(self, spec: TagSpec):
        self.spec = spec
        self.logits = inference_model(spec.lstm)
        self.memory = ActorMemory()

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        self.memory.begin()
        feats = S.binary_views(batch.column(S.FEATURES))
        kinds = (
            batch.column(S.ROW_KIND).to_pylist() if S.ROW_KIND in batch.column_names else [S.VIDEO_ROWS] * len(feats)
        )
        videos = [i for i, f in enumerate(feats) if f is not None and kinds[i] == S.VIDEO_ROWS]
        chunks = [i for i, f in enumerate(feats) if f is not None and kinds[i] == S.CHUNK_ROWS]
        out = batch if self.spec.keep_features else batch.drop_columns([S.FEATURES])
        tags = [*zip(S.VIDEO_TAG_FIELDS, self.video_tags(feats, videos), strict=True)]
        tags += zip(S.WINDOW_TAG_FIELDS, self.window_tags(batch, feats, chunks), strict=True)
        for field, column in tags:  # each kind's tags, null on the rows of the other kind
            out = out.append_column(field, pa.array(column, field.type))
        per_row = (time.perf_counter() - start) / max(len(videos) + len(chunks), 1)
        out = out.append_column(
            S.TAG_SECONDS, pa.array([per_row if f is not None else 0.0 for f in feats], pa.float32())
        )
        self.memory.end()
        for name, mb in ((S.LSTM_PEAK_MB, self.memory.grown), (S.LSTM_CALL_MB, self.memory.call)):
            out = out.append_column(pa.field(name, pa.float32()), pa.array([mb] * len(feats), pa.float32()))
        return out

    def video_tags(self, feats: list, rows: list[int]) -> list[list]:
        """The ``VIDEO_TAG_FIELDS`` columns: each video's tags, a video at a time (its tags must not
        depend on the rows that share its batch)."""
        spec = self.spec
        columns: list[list] = [[None] * len(feats) for _ in S.VIDEO_TAG_FIELDS]
        for i in rows:
            x = feats[i].view(spec.feature_dtype).reshape(1, spec.num_segments, spec.feature_dim).astype(np.float32)
            ids, probs, labels, _ = self.tags(x, np.array([spec.num_segments]))[0]
            for column, value in zip(columns, (ids, probs, labels), strict=True):
                column[i] = value
        return columns

    def tags(self, x: np.ndarray, lengths: np.ndarray) -> list[tuple[list, list, list, list]]:
        """Padded features (n, T, D) -> per sequence (top-k ids, their probabilities, the classes at
        or above the threshold best first, their probabilities)."""
        all_probs = 1.0 / (1.0 + np.exp(-self.logits(x, lengths)))  # as predict computes them
        top = top_k_indices(all_probs, self.spec.top_k)
        out = []
        for p, t in zip(all_probs, top, strict=True):
            above = np.flatnonzero(p >= self.spec.threshold)
            above = above[np.argsort(-p[above], kind="stable")]
            out.append(
                (t.tolist(), p[t].astype(np.float32).tolist(), above.tolist(), p[above].astype(np.float32).tolist())
            )
        return out

    def window_tags(self, batch: pa.Table, feats: list, rows: list[int]) -> list[list]:
        """The ``WINDOW_TAG_FIELDS`` columns: for each chunk row, the tags of each of its windows
        (``WINDOWS_PER_CALL`` windows, padded to the longest, per model call)."""
        columns: list[list] = [[None] * len(feats) for _ in S.WINDOW_TAG_FIELDS]
        if not rows:
            return columns
        spec = self.spec
        lows, highs = batch.column(S.WIN_LO).to_pylist(), batch.column(S.WIN_HI).to_pylist()
        windows = []  # (row, frames of the window)
        for i in rows:
            frames = feats[i].view(spec.feature_dtype).reshape(-1, spec.feature_dim)
            windows += [(i, frames[lo:hi]) for lo, hi in zip(lows[i], highs[i], strict=True)]
            for column in columns:
                column[i] = []
        for offset in range(0, len(windows), WINDOWS_PER_CALL):
            group = windows[offset : offset + WINDOWS_PER_CALL]
            lengths = np.array([len(w) for _, w in group], np.int64)
            x = np.zeros((len(group), lengths.max(), spec.feature_dim), np.float32)
            for j, (_, w) in enumerate(group):
                x[j, : len(w)] = w
            for (i, _), values in zip(group, self.tags(x, lengths), strict=True):
                for column, value in zip(columns, values, strict=True):
                    column[i].append(value)
        return columns


WINDOWS_PER_CALL = 64


def tag_stage(ds, config: Config, spec: TagSpec, sizes: R.PipelineSizes):
    """Adds the AttentionLSTM tagging actors to a dataset of rows with ``features`` bytes. A block a
    call, as the stage before made it (each video goes through the model alone anyway)."""
    actors = sizes.models[MODEL_NAME]
    return ds.map_batches(
        TagStage,
        batch_size=1 if actors.num_gpus else None,  # Ray Data wants a number with GPUs: 1 gathers no blocks
        batch_format="pyarrow",
        compute=actors.compute(),
        fn_constructor_kwargs={"spec": spec},
        **actors.ray_args(),
    )


def inference_stage(ds, spec: ModelSpec, top_k: int | None, batch_size: int, actors: R.ActorSizes):
    """Adds the AttentionLSTM actors to a dataset of numpy feature batches (``lstm_data``)."""
    return ds.map_batches(
        LSTMStage,
        batch_size=batch_size,
        batch_format="numpy",
        compute=actors.compute(),
        fn_constructor_kwargs={"spec": spec, "top_k": top_k},
        **actors.ray_args(),
    )
