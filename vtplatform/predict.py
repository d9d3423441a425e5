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
from typing import Any

import numpy as np
import pyarrow as pa

from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, StorageSection
from vtplatform.labels import label_fingerprint, label_names_for, seed_json_bytes
from vtplatform.lstm_data import make_dataset, plan_inputs
from vtplatform.stages import lstm, tsn
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


class PredictionWriter:
    """Writes ``predictions/part-NNNNN.parquet`` (``ROWS_PER_PART`` rows each, the model and its
    label set in the schema metadata) and, with ``seed_json``, the seed's ``json/result<i>.json``."""

    def __init__(self, save_dir: str, storage: StorageSection, metadata: dict[str, Any], seed_json: bool):
        self.fs, self.root = st.filesystem(save_dir, storage)
        self.schema = S.PREDICTION_SCHEMA.with_metadata({S.METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        self.seed_json = seed_json
        self.pending: list[pa.Table] = []
        self.parts = self.count = 0

    def add(self, table: pa.Table) -> None:
        """``predictions_table`` rows, in order."""
        if self.count == 0 and table.num_rows:
            log.info("top-%d predictions:\n%s", len(table.column(S.CLASS_IDS)[0]), format_predictions(table))
        if self.seed_json:
            for i, row in enumerate(table.to_pylist(), start=self.count):
                st.write_bytes(seed_json_bytes(row), self.fs, f"{self.root}/{S.JSON_DIR}/result{i}.json")
        self.count += table.num_rows
        self.pending.append(table)
        if sum(t.num_rows for t in self.pending) >= ROWS_PER_PART:
            self._flush()

    def close(self) -> None:
        if self.pending or self.parts == 0:
            self._flush()

    def _flush(self) -> None:
        table = pa.concat_tables(self.pending).cast(self.schema) if self.pending else self.schema.empty_table()
        path = f"{self.root}/{S.PREDICTIONS_DIR}/part-{self.parts:05d}.parquet"
        st.write_parquet(table.replace_schema_metadata(self.schema.metadata), self.fs, path)
        self.pending, self.parts = [], self.parts + 1


def prediction_metadata(model: str, weights: str, names: list[str] | None, num_classes: int, top_k: int) -> dict:
    return {
        "model": model,
        "weights": st.redact(weights),
        "label_fingerprint": label_fingerprint(names, num_classes),
        "top_k": top_k,
    }


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
    """AttentionLSTM: top-k tags for every video of ``filelist`` (default INFER.filelist), or with
    ``whole_table`` for every row of the feature table ``data.features``."""
    start = time.perf_counter()
    top_k = top_k or config.model.topk
    inputs = plan_inputs(config, "infer", None if whole_table else filelist or config.infer.filelist, need_labels=False)
    model_config, loaded, batches = run_inference(
        config, weights, inputs, config.infer.use_gpu, top_k, config.infer.batch_size, with_targets=False
    )
    names = label_names_for(label_file, model_config.num_classes, config.storage)
    trained = (loaded.meta or {}).get("label_fingerprint")
    if names is not None and trained and trained != label_fingerprint(names, model_config.num_classes):
        log.warning("label file %s differs from the one the model was trained with", st.redact(label_file))
    metadata = prediction_metadata(lstm.MODEL_NAME, loaded.source, names, model_config.num_classes, top_k)
    writer = PredictionWriter(save_dir, config.storage, metadata, seed_json)
    uris = dict(zip(inputs.rows.column(S.VIDEO_ID).to_pylist(), inputs.rows.column(S.URI).to_pylist(), strict=True))
    for batch in batches:
        ids = [str(v) for v in batch[S.VIDEO_ID]]
        writer.add(predictions_table(ids, [uris.get(v) for v in ids], batch[S.CLASS_IDS], batch[S.PROBS], names))
    writer.close()
    return PredictSummary(
        st.redact(save_dir), writer.count, dict(inputs.skipped), time.perf_counter() - start, st.redact(loaded.source)
    )


def run_predict_tsn(
    config: Config,
    weights: str,
    save_dir: str,
    label_file: str | None = None,
    filelist: str | None = None,
    top_k: int | None = None,
    seed_json: bool = False,
) -> PredictSummary:
    """TSN: top-k (``MODEL.topk``) classes of every INFER video (``INFER.seg_num`` centred
    segments); videos that cannot be loaded become dead letters under ``save_dir``."""
    k = min(top_k or config.model.topk, config.model.num_classes)
    results = classify(config, "infer", weights, filelist, labelled=False)
    names = label_names_for(label_file, config.model.num_classes, config.storage)
    top_ids = np.array([ids[:k] for ids in results.table.column(S.CLASS_IDS).to_pylist()], np.int64).reshape(-1, k)
    top_probs = np.array([p[:k] for p in results.table.column(S.PROBS).to_pylist()], np.float32).reshape(-1, k)
    metadata = prediction_metadata(tsn.MODEL_NAME, weights, names, config.model.num_classes, k)
    writer = PredictionWriter(save_dir, config.storage, metadata, seed_json)
    video_ids, uris = (results.table.column(c).to_pylist() for c in (S.VIDEO_ID, S.URI))
    writer.add(predictions_table(video_ids, uris, top_ids, top_probs, names))
    writer.close()
    results.write_dead_letters(save_dir, config.storage)
    return PredictSummary(
        st.redact(save_dir), writer.count, results.failure_counts(), results.elapsed_seconds, st.redact(weights)
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
