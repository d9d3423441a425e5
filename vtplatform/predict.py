"""Prediction with either model, side by side: top-k tags per video.

* ``run_predict``: AttentionLSTM, from a feature table or the seed's .npy files (the LSTM stage,
  ``stages.lstm``, over ``lstm_data``'s batches; ``inference_dataset`` is shared with its evaluation);
* ``run_predict_tsn``: the TSN classifier, from videos (``stages.classifier.classify``, shared
  with its evaluation).

Both stream their rows through the writer stage into ``outputs.predictions`` (and dead letters for
videos that could not be loaded), like every per-video job: nothing is gathered in the driver.

Output under ``save_dir`` (a local folder or ``s3://`` prefix)::

    predictions/part-<hash>.parquet  schema.PREDICTION_SCHEMA: video_id, uri, class ids, names,
                                     probabilities (top k, best first)
    json/result<i>.json              with seed_json: the seed's per-video file, i the video's place
                                     in the list: [video_id, {"class_id", "class_name", "probability"}, ...]

Class names come from the label file (line i = class i). Names are not unique (VideoTag's
label_3396.txt has 10 repeated names), so every output keeps the class ids.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config
from vtplatform.labels import label_fingerprint, label_names_for
from vtplatform.lstm_data import make_dataset, read_inputs
from vtplatform.outputs import with_metadata
from vtplatform.outputs.dead_letters import DeadLetterOutput, write_dead_letters
from vtplatform.outputs.predictions import PredictionOutput
from vtplatform.pipeline import finalize_outputs, prepare_output, write_rows
from vtplatform.stages import lstm, tsn
from vtplatform.stages.classifier import classify

log = logging.getLogger(__name__)


def inference_dataset(
    config: Config, weights: str, inputs, phase_use_gpu: bool, top_k: int | None, batch_size: int, with_targets: bool
):
    """(model config, loaded weights, the planned ``inputs`` through the model on an actor pool:
    a dataset of numpy batches)."""
    model_config, loaded = lstm.resolve_model(config, weights, inputs.feature_dim)
    lstm.check_feature_provenance(config, loaded.meta, inputs.provenance, inputs.source)
    sizes = R.size_pipeline(config, [lstm.inference_need(config)], phase_use_gpu)
    actors = sizes.models[lstm.MODEL_NAME]
    spec = lstm.ModelSpec(model_config, loaded.source, config.storage, actors.num_gpus > 0, actors.threads)
    ds = make_dataset(inputs, config, with_targets=with_targets, task_cpus=sizes.task_cpus)
    return model_config, loaded, lstm.inference_stage(ds, spec, top_k, batch_size, actors)


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


def prediction_output(
    model: str, weights: str, names: list[str] | None, num_classes: int, top_k: int, save_dir: str, seed_json: bool
) -> PredictionOutput:
    """The predictions table, its metadata recording the model, weights, label set and k."""
    made = {
        "model": model,
        "weights": st.redact(weights),
        "label_fingerprint": label_fingerprint(names, num_classes),
        "top_k": top_k,
    }
    return PredictionOutput(with_metadata(S.PREDICTION_SCHEMA, made), names, save_dir, seed_json)


def _write(config: Config, save_dir: str, ds, output: PredictionOutput, expected: pa.Array) -> dict:
    """The rows of ``ds`` into the predictions (and dead letters), finalized; logs the first ones."""
    fs, root = st.filesystem(save_dir, config.storage)
    outputs = [output, DeadLetterOutput()]
    for o in outputs:
        o.check(fs, root)
    stats = write_rows(ds, config, save_dir, outputs)
    finalize_outputs(outputs, fs, root, expected)
    parts = output.parts(fs, root)
    if parts:
        log.info("predictions (a first part):\n%s", format_predictions(pq.read_table(parts[0], filesystem=fs)))
    return stats


def _lstm_rows(batch: dict[str, np.ndarray], ids: pa.Array, uris: pa.Array) -> pa.Table:
    """The LSTM stage's numpy batch -> prediction rows with each video's uri and place in the list."""
    vids = pa.array([str(v) for v in batch[S.VIDEO_ID]], pa.string())
    where = pc.index_in(vids, value_set=ids)
    return pa.table(
        {
            S.VIDEO_ID: vids,
            S.URI: uris.take(where),
            S.LIST_INDEX: where.cast(pa.int64()),
            S.CLASS_IDS: pa.array(batch[S.CLASS_IDS].tolist(), pa.list_(pa.int32())),
            S.PROBS: pa.array(batch[S.PROBS].tolist(), pa.list_(pa.float32())),
        }
    )


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
    ``whole_table`` for every row of the feature table ``data.features``. Needs ``ray.init()``."""
    start = time.perf_counter()
    config = prepare_output(config, save_dir)
    top_k = top_k or config.model.topk
    inputs = read_inputs(config, "infer", None if whole_table else filelist or config.infer.filelist, need_labels=False)
    model_config, loaded, ds = inference_dataset(
        config, weights, inputs, config.infer.use_gpu, top_k, config.infer.batch_size, with_targets=False
    )
    names = label_names_for(label_file, model_config.num_classes, config.storage)
    trained = (loaded.meta or {}).get("label_fingerprint")
    if names is not None and trained and trained != label_fingerprint(names, model_config.num_classes):
        log.warning("label file %s differs from the one the model was trained with", st.redact(label_file))
    output = prediction_output(
        lstm.MODEL_NAME, loaded.source, names, model_config.num_classes, top_k, save_dir, seed_json
    )
    ids, uris = (inputs.rows.column(c).combine_chunks() for c in (S.VIDEO_ID, S.URI))
    ds = ds.map_batches(_lstm_rows, batch_format="numpy", fn_kwargs={"ids": ids, "uris": uris})
    stats = _write(config, save_dir, ds, output, ids)
    return PredictSummary(
        st.redact(save_dir), stats["ok"], dict(inputs.skipped), time.perf_counter() - start, st.redact(loaded.source)
    )


def _tsn_rows(batch: pa.Table, ids: pa.Array, k: int) -> pa.Table:
    """Classifier rows -> prediction rows (the top ``k``, each video's place in the list), failures kept."""
    where = pc.index_in(batch.column(S.VIDEO_ID), value_set=ids)
    return pa.table(
        {
            S.VIDEO_ID: batch.column(S.VIDEO_ID),
            S.URI: batch.column(S.URI),
            S.LIST_INDEX: where.cast(pa.int64()),
            S.CLASS_IDS: pc.list_slice(batch.column(S.CLASS_IDS), 0, k),
            S.PROBS: pc.list_slice(batch.column(S.PROBS), 0, k),
            S.STAGE: batch.column(S.STAGE),
            S.ERROR_TYPE: batch.column(S.ERROR_TYPE),
            S.MESSAGE: batch.column(S.MESSAGE),
        }
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
    start = time.perf_counter()
    config = prepare_output(config, save_dir)
    k = min(top_k or config.model.topk, config.model.num_classes)
    classified = classify(config, "infer", weights, filelist, labelled=False)
    names = label_names_for(label_file, config.model.num_classes, config.storage)
    output = prediction_output(tsn.MODEL_NAME, weights, names, config.model.num_classes, k, save_dir, seed_json)
    fs, root = st.filesystem(save_dir, config.storage)
    write_dead_letters(classified.rejected, fs, root, prefix="manifest")
    ids = classified.entries.column(S.VIDEO_ID).combine_chunks()
    ds = classified.dataset.map_batches(_tsn_rows, batch_format="pyarrow", fn_kwargs={"ids": ids, "k": k})
    stats = _write(config, save_dir, ds, output, ids)
    failed = dict(stats["failed"])
    for r in classified.rejected:
        reason = f"{r[S.STAGE]}/{r[S.ERROR_TYPE]}"
        failed[reason] = failed.get(reason, 0) + 1
    return PredictSummary(st.redact(save_dir), stats["ok"], failed, time.perf_counter() - start, st.redact(weights))


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
