"""AttentionLSTM inference: top-k tags per video from a feature table or the seed's .npy files.

Output under ``save_dir`` (a local folder or ``s3://`` prefix)::

    predictions/part-NNNNN.parquet   schema.PREDICTION_SCHEMA: video_id, uri, class ids, names,
                                     probabilities (top k, best first)
    json/result<i>.json              with seed_json: the seed's per-video file,
                                     [video_id, {"class_id", "class_name", "probability"}, ...]

Class names come from the label file (line i = class i). Names are not unique (VideoTag's
label_3396.txt has 10 repeated names), so every output keeps the class ids.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.labels import check_label_names, label_fingerprint, read_label_names, top_k_indices

log = logging.getLogger(__name__)

ROWS_PER_PART = 10_000


@dataclass(frozen=True)
class ModelSpec:
    """Everything an inference actor needs to build and load the model."""

    model: Any  # AttentionLSTMConfig
    weights: str
    storage: StorageSection
    use_gpu: bool = False
    threads: int = 1


def resolve_model(config: Config, weights: str, feature_dim: int):
    """(AttentionLSTMConfig, LoadedWeights): the checkpoint's own dims when it records them,
    else the config's (with ``feature_dim`` from the features)."""
    from vtplatform.models.attention_lstm import AttentionLSTMConfig
    from vtplatform.models.weights import read_weights

    loaded = read_weights(weights, config.storage).require("AttentionLSTM")
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
        import paddle

        from vtplatform.models.attention_lstm import build_model, load_state
        from vtplatform.models.weights import read_weights

        paddle.set_device("gpu" if spec.use_gpu else "cpu")
        if not spec.use_gpu:
            paddle.base.core.set_num_threads(spec.threads)
        self.model = build_model(spec.model)
        self.model.eval()
        load_state(self.model, read_weights(spec.weights, spec.storage).state, spec.weights)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vtplatform.lstm_data import collate

        x, lengths, targets = collate(batch)
        logits = forward_logits(self.model, x, lengths)
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


def forward_logits(model, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    import paddle

    with paddle.no_grad():
        return model(paddle.to_tensor(x), paddle.to_tensor(lengths)).numpy().astype(np.float64)


def sigmoid_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Element-wise, in the numerically stable form max(x, 0) - x*z + log(1 + exp(-|x|))."""
    return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


def run_inference(
    config: Config, weights: str, inputs, phase_use_gpu: bool, top_k: int | None, batch_size: int, with_targets: bool
):
    """The planned ``inputs`` through the model on an actor pool; yields numpy batches."""
    from vtplatform import resources as R
    from vtplatform.lstm_data import make_dataset

    model_config, loaded = resolve_model(config, weights, inputs.feature_dim)
    check_feature_provenance(config, loaded.meta, inputs.provenance, inputs.source)
    plan = R.size_pipeline(config, [R.lstm_inference_need(config)], phase_use_gpu)
    model = plan.models["AttentionLSTM"]
    spec = ModelSpec(model_config, loaded.source, config.storage, model.num_gpus > 0, model.threads)
    ds = make_dataset(inputs, config, with_targets=with_targets, task_cpus=plan.task_cpus)
    ds = ds.map_batches(
        LSTMStage,
        batch_size=batch_size,
        batch_format="numpy",
        compute=model.compute(),
        fn_constructor_kwargs={"spec": spec, "top_k": top_k},
        **model.ray_args(),
    )
    return model_config, loaded, ds.iter_batches(batch_size=None, batch_format="numpy")


@dataclass
class PredictSummary:
    save_dir: str
    videos: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    weights: str = ""

    def format(self) -> str:
        rate = self.videos / self.elapsed_seconds if self.elapsed_seconds else 0.0
        lines = [
            "prediction summary",
            f"  weights      {self.weights}",
            f"  videos       {self.videos} ({rate:.1f}/s)",
            f"  predictions  {self.save_dir.rstrip('/')}/{S.PREDICTIONS_DIR}",
        ]
        lines += [f"  skipped      {n} {reason}" for reason, n in sorted(self.skipped.items())]
        return "\n".join(lines)


def run_predict(
    config: Config,
    weights: str,
    save_dir: str,
    label_file: str | None = None,
    filelist: str | None = None,
    top_k: int | None = None,
    seed_json: bool = False,
    whole_table: bool = False,
) -> PredictSummary:
    """Top-k tags for every video of ``filelist`` (default INFER.filelist), or with ``whole_table``
    for every row of the feature table ``data.features``."""
    from vtplatform.lstm_data import plan_inputs

    start = time.perf_counter()
    top_k = top_k or config.model.topk
    inputs = plan_inputs(config, "infer", None if whole_table else filelist or config.infer.filelist, need_labels=False)
    model_config, loaded, batches = run_inference(
        config, weights, inputs, config.infer.use_gpu, top_k, config.infer.batch_size, with_targets=False
    )
    names = read_label_names(label_file, config.storage) if label_file else None
    if names is not None:
        check_label_names(names, model_config.num_classes, label_file)
        trained = (loaded.meta or {}).get("label_fingerprint")
        if trained and trained != label_fingerprint(names, model_config.num_classes):
            log.warning("label file %s differs from the one the model was trained with", st.redact(label_file))
    fs, root = st.filesystem(save_dir, config.storage)
    uris = dict(zip(inputs.rows.column(S.VIDEO_ID).to_pylist(), inputs.rows.column(S.URI).to_pylist(), strict=True))
    metadata = {
        "model": "AttentionLSTM",
        "weights": loaded.source,
        "label_fingerprint": label_fingerprint(names, model_config.num_classes),
        "top_k": top_k,
    }
    schema = S.PREDICTION_SCHEMA.with_metadata({S.METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    rows: list[dict] = []
    part = count = 0
    for batch in batches:
        for vid, ids, probs in zip(batch[S.VIDEO_ID], batch[S.CLASS_IDS], batch[S.PROBS], strict=True):
            row = {
                S.VIDEO_ID: str(vid),
                S.URI: uris.get(str(vid)),
                S.CLASS_IDS: ids.tolist(),
                S.CLASS_NAMES: [names[i] for i in ids] if names is not None else None,
                S.PROBS: probs.tolist(),
            }
            if seed_json:
                st.write_bytes(seed_json_bytes(row), fs, f"{root}/{S.JSON_DIR}/result{count}.json")
            if count < 3:
                log.info(
                    "%s: %s",
                    row[S.VIDEO_ID],
                    ", ".join(
                        f"{i} {n or ''} {p:.4f}"
                        for i, n, p in zip(ids, row[S.CLASS_NAMES] or [None] * len(ids), probs, strict=True)
                    ),
                )
            rows.append(row)
            count += 1
        if len(rows) >= ROWS_PER_PART:
            st.write_parquet(
                pa.Table.from_pylist(rows, schema=schema), fs, f"{root}/{S.PREDICTIONS_DIR}/part-{part:05d}.parquet"
            )
            rows, part = [], part + 1
    if rows or part == 0:
        st.write_parquet(
            pa.Table.from_pylist(rows, schema=schema), fs, f"{root}/{S.PREDICTIONS_DIR}/part-{part:05d}.parquet"
        )
    return PredictSummary(
        st.redact(save_dir), count, dict(inputs.skipped), time.perf_counter() - start, st.redact(loaded.source)
    )


def seed_json_bytes(row: dict) -> bytes:
    """The seed's per-video JSON, with the key ``class_id`` (the original wrote ``'class_id``)."""
    items: list[Any] = [row[S.VIDEO_ID]]
    names = row[S.CLASS_NAMES] or [None] * len(row[S.CLASS_IDS])
    for class_id, name, prob in zip(row[S.CLASS_IDS], names, row[S.PROBS], strict=True):
        items.append({"class_id": int(class_id), "class_name": name, "probability": float(prob)})
    return json.dumps(items, ensure_ascii=False).encode("utf-8")
