"""Batch tagging: manifest -> decode (CPU tasks) -> TSN (actors) -> AttentionLSTM (actors) -> tags,
in one Ray Data pipeline; no feature files are written in between.

Output under ``save_dir`` (local or ``s3://``)::

    tags/part-<hash>.parquet        schema.TAG_SCHEMA: top-k ids, names, probabilities, and the
                                    labels at or above tag.threshold
    segments/part-<hash>.parquet    with tag.segment_seconds (--segments): schema.SEGMENT_SCHEMA, the
                                    same for each window of the video's timeline
    spans/part-<hash>.parquet       with segments: schema.SPAN_SCHEMA, the windows where a label stays
                                    at or above tag.threshold merged into time spans
    timeline/part-<hash>.parquet    with segments and tag.write_timeline: each timeline frame's features
    thumbnails/<video_id>.jpg       with tag.thumbnails (--thumbnails): one per video, and
    thumbnails/<video_id>/<window>.jpg one per window, for jobs/report.py
    dead_letters/*.parquet          one row per video that failed
    features/part-<hash>.parquet    with tag.write_features: the TSN features, as jobs/extract.py writes them
    json/<video_id>.json            with --format json: the seed's per-video result
    hub_results.json                with --format hub: a PaddleHub-style list [{path, prediction: {name: p}}]

With segments the decode tasks also read each video at tag.timeline_fps frames a second of
presentation time, streaming, and send its timeline through TSN in chunks of whole windows
(``segments.chunk_windows``); the AttentionLSTM tags each window. The video-level tags are the
same with or without segments. A video is done when its tags row and all its chunks are written.

Incremental and resumable like extraction. The features go through the AttentionLSTM rounded to
``output.dtype``, exactly as they would be read back from a feature table, so tagging equals
extraction followed by ``jobs/predict.py``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError
from vtplatform.labels import check_label_names, label_fingerprint, read_label_names, seed_json_bytes
from vtplatform.models.weights import fingerprint
from vtplatform.pipeline import (
    JobSummary,
    OutputState,
    ResultSink,
    VideoJob,
    blocks_dataset,
    finalize_output,
    output_state,
    prepare_output,
    run_video_job,
)
from vtplatform.segments import (
    SegmentOutput,
    ThumbnailOutput,
    TimelineOutput,
    complete_videos,
    finalize_segments,
    video_rows,
)
from vtplatform.stages import lstm, tsn
from vtplatform.stages.decode import decode_stage

log = logging.getLogger(__name__)

FORMATS = ("json", "hub")


class TagOutput:
    """Good rows -> one ``tags`` part, plus the seed's per-video JSON files when asked."""

    directory = S.TAGS_DIR

    def __init__(self, schema: pa.Schema, names: list[str] | None, seed_json: bool):
        self.schema = schema
        self.names = names
        self.seed_json = seed_json

    def write(self, good: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        good = video_rows(good)
        if not good.num_rows:
            return
        rows = []
        for vid, uri, ids, probs, labels in zip(
            *(good.column(c).to_pylist() for c in (S.VIDEO_ID, S.URI, S.CLASS_IDS, S.PROBS, S.LABELS)), strict=True
        ):
            rows.append(
                {
                    S.VIDEO_ID: vid,
                    S.URI: uri,
                    S.CLASS_IDS: ids,
                    S.CLASS_NAMES: [self.names[i] for i in ids] if self.names else None,
                    S.PROBS: probs,
                    S.LABELS: labels,
                    S.LABEL_NAMES: [self.names[i] for i in labels] if self.names else None,
                }
            )
        st.write_parquet(pa.Table.from_pylist(rows, schema=self.schema), fs, f"{root}/{self.directory}/{part}")
        if self.seed_json:
            for row in rows:
                st.write_bytes(
                    seed_json_bytes(row), fs, f"{root}/{S.JSON_DIR}/{st.safe_filename(row[S.VIDEO_ID])}.json"
                )


@dataclass
class Tagger:
    """The AttentionLSTM side of tagging, resolved once in the driver."""

    spec: lstm.TagSpec
    names: list[str] | None
    meta: dict[str, Any]  # recorded in every tags part

    def schema(self, base: pa.Schema = S.TAG_SCHEMA) -> pa.Schema:
        return base.with_metadata({S.METADATA_KEY: json.dumps(self.meta, sort_keys=True).encode()})


def build_tagger(
    config: Config,
    lstm_weights: str,
    prov: dict[str, Any],
    feature_dtype: str,
    actors: R.ActorStage,
    keep_features: bool,
) -> Tagger:
    """Resolves the AttentionLSTM weights for features described by ``prov`` (their provenance),
    checks that the model was trained on such features, and reads the class names."""
    tag = config.tag
    segments, dim = prov["sampling"]["num_segments"], prov["model"]["feature_dim"]
    model_config, loaded = lstm.resolve_model(config, lstm_weights, dim)
    lstm.check_feature_provenance(config, loaded.meta, prov, "the TSN features")
    names = read_label_names(tag.label_file, config.storage) if tag.label_file else None
    if names is not None:
        check_label_names(names, model_config.num_classes, tag.label_file)
    top_k = tag.topk or config.model.topk
    meta = {
        "schema_version": S.SCHEMA_VERSION,
        "tsn_weights": prov["weights"],
        "features": S.extractor_signature(prov),
        "lstm_weights": fingerprint(sorted(loaded.state.items())),
        "lstm_source": st.redact(loaded.source),
        "top_k": top_k,
        "threshold": tag.threshold,
        "label_fingerprint": label_fingerprint(names, model_config.num_classes),
        "segments": segment_settings(tag),
    }
    spec = lstm.TagSpec(
        lstm=lstm.ModelSpec(model_config, loaded.source, config.storage, actors.num_gpus > 0, actors.threads),
        top_k=top_k,
        threshold=tag.threshold,
        feature_dtype=feature_dtype,
        num_segments=segments,
        feature_dim=dim,
        keep_features=keep_features,
    )
    return Tagger(spec, names, meta)


def segment_settings(tag) -> dict[str, float] | None:
    if not tag.segment_seconds:
        return None
    stride = tag.segment_stride_seconds or tag.segment_seconds
    return {
        "seconds": tag.segment_seconds,
        "stride_seconds": stride,
        "timeline_fps": tag.timeline_fps,
        "timeline_chunk_frames": tag.timeline_chunk_frames,  # chunk numbers mean "done": they must not mix
    }


def check_same_tagger(existing: pa.Schema | None, meta: dict, where: str) -> None:
    old = S.read_provenance(existing) if existing is not None else None
    if old is None:
        return
    keys = ("tsn_weights", "features", "lstm_weights", "top_k", "threshold", "label_fingerprint", "segments")
    diff = [k for k in keys if old.get(k) != meta.get(k)]
    if diff:
        raise ConfigError(
            f"{st.redact(where)} holds tags made with other settings ({', '.join(diff)} differ); use another --save_dir"
        )


def run_tag(
    config: Config,
    manifest: str,
    save_dir: str,
    lstm_weights: str,
    tsn_weights: str | None = None,
    formats: tuple[str, ...] = (),
    retry_failed: bool = False,
) -> JobSummary:
    """Tags every manifest video not yet in ``save_dir``. Needs ``ray.init()``."""
    start = time.perf_counter()
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ConfigError(f"--format takes {list(FORMATS)}, got {sorted(unknown)}")
    config = prepare_output(config, save_dir)
    plan = R.size_pipeline(config, [tsn.need(config), lstm.tag_need(config)])
    spec = tsn.tsn_spec(config, tsn_weights, plan.device, plan.models[tsn.MODEL_NAME].threads)
    tsn_fingerprint, feature_dim = tsn.weights_fingerprint(config, tsn_weights)
    prov = tsn.provenance(config, tsn_fingerprint, feature_dim, spec.precision)
    tag = config.tag
    segments = bool(tag.segment_seconds)
    keep_timeline = segments and tag.write_timeline
    keep_features = tag.write_features
    actors = plan.models[lstm.MODEL_NAME]
    tagger = build_tagger(config, lstm_weights, prov, config.output.dtype, actors, keep_features or keep_timeline)
    outputs: list = [TagOutput(tagger.schema(), tagger.names, "json" in formats)]
    if keep_features:
        schema = S.feature_schema(config.infer.seg_num, feature_dim, config.output.dtype, prov)
        outputs.append(tsn.FeatureOutput(schema, write_npy=False))
    if segments:
        outputs.append(SegmentOutput(tagger.schema(S.SEGMENT_SCHEMA), tagger.names))
    if keep_timeline:
        made = {**prov, "timeline": segment_settings(tag)}  # how the features were made, and at which times
        timeline = S.timeline_schema(feature_dim, config.output.dtype)
        outputs.append(TimelineOutput(timeline.with_metadata({S.METADATA_KEY: json.dumps(made, sort_keys=True)})))
    if tag.thumbnails:
        outputs.append(ThumbnailOutput())

    def check_output(fs: pafs.FileSystem, root: str, state: OutputState) -> None:
        check_same_tagger(state.schema, tagger.meta, save_dir)
        if keep_features:
            tsn.check_same_extractor(output_state(fs, root, S.FEATURES_DIR).schema, prov, save_dir)

    def done(fs: pafs.FileSystem, root: str, tagged: pa.Array) -> pa.Array:
        """With segments, a tagged video whose windows are not all written (a kill) is not done."""
        whole = complete_videos(fs, root)
        return tagged.filter(pc.is_in(tagged, value_set=whole))

    def finish(fs: pafs.FileSystem, root: str) -> None:
        if segments:
            classes = tagger.spec.lstm.model.num_classes
            spanned = finalize_segments(fs, root, tagger.names, classes)
            log.info("spans of %d videos written to %s/%s", spanned, st.redact(save_dir), S.SPANS_DIR)
        if "hub" in formats:
            write_hub_list(fs, root, tag.hub_threshold, tag.hub_top_k)

    job = VideoJob(
        "tagging",
        S.TAGS_DIR,
        spec.device,
        stages=lambda ds: lstm.tag_stage(
            tsn.tsn_stage(decode_stage(ds, config, plan, tagging=True), config, spec, plan),
            config,
            tagger.spec,
            plan,
        ),
        outputs=outputs,
        writer_cpus=plan.writer_cpus,
        frames_per_video=config.infer.seg_num,
        check_output=check_output,
        done=done if segments else None,
        counters=(S.TIMELINE_FRAMES, S.WINDOWS) if segments else (),
        finish=finish,
    )
    return run_video_job(config, manifest, save_dir, job, retry_failed, start)


def write_hub_list(fs: pafs.FileSystem, root: str, threshold: float, top_k: int) -> None:
    """PaddleHub's videotag output for the whole tags table: ``[{"path": uri, "prediction": {name: p}}]``
    with the tags at or above ``threshold``, at most ``top_k`` per video (names, or ids without a label file)."""
    files = st.list_files(fs, f"{root}/{S.TAGS_DIR}", ".parquet")
    items = []
    for path in files:
        table = pq.read_table(path, filesystem=fs, columns=[S.URI, S.CLASS_IDS, S.CLASS_NAMES, S.PROBS])
        for uri, ids, names, probs in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
            prediction: dict[str, float] = {}
            for key, p in list(zip(names or [str(i) for i in ids], probs, strict=True))[:top_k]:
                if p >= threshold:
                    prediction.setdefault(key, float(p))  # names repeat in label_3396.txt: keep the best
            items.append({"path": uri, "prediction": prediction})
    items.sort(key=lambda item: item["path"])
    st.write_bytes(json.dumps(items, ensure_ascii=False, indent=1).encode("utf-8"), fs, f"{root}/{S.HUB_FILE}")


def _feature_rows(batch: pa.Table, storage, skip: frozenset[str]) -> pa.Table:
    """Feature part files (one path per row) -> their untagged rows, with ``features`` as raw bytes
    and the null error columns the tagging stage and the writer expect."""
    tables = []
    for path in batch.column("path").to_pylist():
        fs, inner = st.filesystem(path, storage)
        table = pq.read_table(inner, filesystem=fs, columns=[S.VIDEO_ID, S.URI, S.FEATURES])
        keep = [vid not in skip for vid in table.column(S.VIDEO_ID).to_pylist()]
        tables.append(table.filter(pa.array(keep, pa.bool_())))
    table = pa.concat_tables(tables)
    feats = table.column(S.FEATURES).combine_chunks().to_numpy_ndarray() if table.num_rows else []
    nulls = pa.nulls(table.num_rows, pa.string())
    return pa.table(
        {
            S.VIDEO_ID: table.column(S.VIDEO_ID),
            S.URI: table.column(S.URI),
            S.FEATURES: pa.array([f.tobytes() for f in feats], pa.large_binary()),
            S.STAGE: nulls,
            S.ERROR_TYPE: nulls,
            S.MESSAGE: nulls,
        }
    )


def tag_features(config: Config, features: str, save_dir: str, lstm_weights: str, model_id: str) -> int:
    """Tags every row of a feature table that ``save_dir`` has no tags for yet (the nightly run's
    last step); returns how many it tagged. Tags from different models share ``save_dir``; each
    part records its model in the schema metadata."""

    ffs, froot = st.filesystem(features, config.storage)
    parts = st.list_files(ffs, froot, ".parquet")
    if not parts:
        return 0
    fs, root = st.filesystem(save_dir, config.storage)
    done = frozenset(output_state(fs, root, S.TAGS_DIR).done.to_pylist())
    schema = pq.read_schema(parts[0], filesystem=ffs)
    dtype = np.dtype(schema.field(S.FEATURES).type.value_type.to_pandas_dtype()).name
    plan = R.size_pipeline(config, [lstm.tag_need(config)])
    actors = plan.models[lstm.MODEL_NAME]
    tagger = build_tagger(config, lstm_weights, S.read_provenance(schema), dtype, actors, keep_features=False)
    tagger.meta["model_id"] = model_id
    sink = ResultSink(
        save_dir, config.storage, [TagOutput(tagger.schema(), tagger.names, False)], config.output.rows_per_file
    )
    uris = [p if ffs.type_name == "local" else f"s3://{p}" for p in parts]
    ds = blocks_dataset([pa.table({"path": [u]}) for u in uris])
    ds = ds.map_batches(
        _feature_rows,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=plan.task_cpus,
        fn_kwargs={"storage": config.storage, "skip": done},
    )
    lstm.tag_stage(ds, config, tagger.spec, plan).write_datasink(sink, ray_remote_args={"num_cpus": plan.writer_cpus})
    finalize_output(fs, root, S.TAGS_DIR, expected=None)
    log.info("tagged %d videos with %s", sink.stats.get("ok", 0), model_id)
    return sink.stats.get("ok", 0)
