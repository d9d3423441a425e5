"""Prediction with either model, side by side: top-k tags per video.

* ``run_predict``: AttentionLSTM, from a feature table or the seed's .npy files (the LSTM stage,
  ``stages.lstm``, over ``lstm_data``'s batches; ``run_inference`` is shared with its evaluation);
* ``run_predict_tsn``: the TSN classifier, from videos (``stages.classifier.classify``, shared
  with its evaluation).

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
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config
from vtplatform.labels import label_fingerprint, label_names_for, seed_json_bytes
from vtplatform.lstm_data import make_dataset, plan_inputs
from vtplatform.stages import lstm
from vtplatform.stages.classifier import classify

log = logging.getLogger(__name__)

ROWS_PER_PART = 10_000


def run_inference(
    config: Config, weights: str, inputs, phase_use_gpu: bool, top_k: int | None, batch_size: int, with_targets: bool
):
    """The planned ``inputs`` through the model on an actor pool; yields numpy batches."""
    model_config, loaded = lstm.resolve_model(config, weights, inputs.feature_dim)
    lstm.check_feature_provenance(config, loaded.meta, inputs.provenance, inputs.source)
    plan = R.size_pipeline(config, [lstm.inference_need(config)], phase_use_gpu)
    actors = plan.models[lstm.MODEL_NAME]
    spec = lstm.ModelSpec(model_config, loaded.source, config.storage, actors.num_gpus > 0, actors.threads)
    ds = make_dataset(inputs, config, with_targets=with_targets, task_cpus=plan.task_cpus)
    ds = lstm.inference_stage(ds, spec, top_k, batch_size, actors)
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
    start = time.perf_counter()
    top_k = top_k or config.model.topk
    inputs = plan_inputs(config, "infer", None if whole_table else filelist or config.infer.filelist, need_labels=False)
    model_config, loaded, batches = run_inference(
        config, weights, inputs, config.infer.use_gpu, top_k, config.infer.batch_size, with_targets=False
    )
    names = label_names_for(label_file, model_config.num_classes, config.storage)
    if names is not None:
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


def run_predict_tsn(
    config: Config,
    weights: str,
    save_dir: str,
    label_file: str | None = None,
    filelist: str | None = None,
    top_k: int | None = None,
    seed_json: bool = False,
):
    """Top-k (``MODEL.topk``) classes of every INFER video (``INFER.seg_num`` centred segments):
    ``save_dir/predictions/part-00000.parquet`` and, with ``seed_json``, ``json/result<i>.json``."""
    k = min(top_k or config.model.topk, config.model.num_classes)
    results = classify(config, "infer", weights, filelist, labelled=False)
    names = label_names_for(label_file, config.model.num_classes, config.storage)
    top_ids = np.array([ids[:k] for ids in results.table.column(S.CLASS_IDS).to_pylist()], np.int64).reshape(-1, k)
    top_probs = np.array([p[:k] for p in results.table.column(S.PROBS).to_pylist()], np.float32).reshape(-1, k)
    table = predictions_table(
        results.table.column(S.VIDEO_ID).to_pylist(), results.table.column(S.URI).to_pylist(), top_ids, top_probs, names
    )
    metadata = {
        "model": "TSN",
        "weights": st.redact(weights),
        "label_fingerprint": label_fingerprint(names, config.model.num_classes),
        "top_k": k,
    }
    table = table.replace_schema_metadata({S.METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    fs, root = st.filesystem(save_dir, config.storage)
    st.write_parquet(table, fs, f"{root}/{S.PREDICTIONS_DIR}/part-00000.parquet")
    if seed_json:
        for i, row in enumerate(table.to_pylist()):
            st.write_bytes(seed_json_bytes(row), fs, f"{root}/{S.JSON_DIR}/result{i}.json")
    results.write_dead_letters(save_dir, config.storage)
    log.info("top-%d predictions:\n%s", k, format_predictions(table))
    return PredictSummary(
        st.redact(save_dir),
        table.num_rows,
        results.failure_counts(),
        results.elapsed_seconds,
        st.redact(weights),
    )


def predictions_table(
    video_ids: list[str], uris: list[str], top_ids: np.ndarray, top_probs: np.ndarray, class_names: Sequence[str] | None
) -> pa.Table:
    """``schema.PREDICTION_SCHEMA`` rows; ``class_names`` null without a label file."""
    names = [[class_names[c] for c in row] for row in top_ids.tolist()] if class_names is not None else None
    return pa.table(
        {
            S.VIDEO_ID: video_ids,
            S.URI: uris,
            S.CLASS_IDS: pa.array(top_ids.tolist(), pa.list_(pa.int32())),
            S.CLASS_NAMES: pa.array(names or [None] * len(video_ids), pa.list_(pa.string())),
            S.PROBS: pa.array(top_probs.astype(np.float32).tolist(), pa.list_(pa.float32())),
        },
        schema=S.PREDICTION_SCHEMA,
    )


def format_predictions(table: pa.Table, limit: int | None = 20) -> str:
    """A readable table: one line per (video, rank)."""
    lines = [f"{'video':<40} {'rank':>4} {'class_id':>8}  {'probability':>11}  class_name"]
    for row in table.slice(0, limit if limit is not None else table.num_rows).to_pylist():
        names = row[S.CLASS_NAMES] or [""] * len(row[S.CLASS_IDS])
        for rank, (c, n, p) in enumerate(zip(row[S.CLASS_IDS], names, row[S.PROBS], strict=True), start=1):
            video = os.path.basename(row[S.URI]) if rank == 1 else ""
            lines.append(f"{video[:40]:<40} {rank:>4} {c:>8}  {p:>11.6f}  {n}")
    if limit is not None and table.num_rows > limit:
        lines.append(f"... {table.num_rows - limit} more videos")
    return "\n".join(lines)
