"""Batch tagging: manifest -> decode (CPU tasks) -> TSN (actors) -> AttentionLSTM (actors) -> tags,
in one Ray Data pipeline; no feature files are written in between. Or, with ``run_tag_features``,
a feature table -> AttentionLSTM -> tags, with no video opened.

Output under ``save_dir`` (local or ``s3://``), one module of ``outputs`` each::

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
(``windows.chunk_windows``); the AttentionLSTM tags each window. The video-level tags are the
same with or without segments. A video is done when its tags row and all its chunks are written.

Incremental and resumable like extraction. The features go through the AttentionLSTM rounded to
``output.dtype``, exactly as they would be read back from a feature table, so tagging equals
extraction followed by ``jobs/predict.py``, and tagging a feature table equals tagging its videos.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError
from vtplatform.labels import check_label_names, label_fingerprint, read_label_names
from vtplatform.manifest import Manifest
from vtplatform.models.weights import fingerprint
from vtplatform.outputs import Output, with_metadata
from vtplatform.outputs.features import FeatureOutput
from vtplatform.outputs.segments import WindowTagOutput
from vtplatform.outputs.spans import SpanOutput
from vtplatform.outputs.tags import HubList, TagOutput
from vtplatform.outputs.thumbnails import ThumbnailOutput
from vtplatform.outputs.timeline import TimelineOutput
from vtplatform.pipeline import JobSummary, VideoJob, map_cpu_tasks, prepare_output, read_entries, run_video_job
from vtplatform.stages import lstm, tsn
from vtplatform.stages.decode import decode_stage

log = logging.getLogger(__name__)

FORMATS = ("json", "hub")


@dataclass
class Tagger:
    """The AttentionLSTM side of tagging, resolved once in the driver."""

    spec: lstm.TagSpec
    names: list[str] | None
    meta: dict[str, Any]  # recorded in every tags part

    def schema(self, base: pa.Schema = S.TAG_SCHEMA) -> pa.Schema:
        return with_metadata(base, self.meta)


def build_tagger(
    config: Config,
    lstm_weights: str,
    prov: dict[str, Any],
    feature_dtype: str,
    actors: R.ActorSizes,
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


def tag_outputs(
    config: Config, tagger: Tagger, save_dir: str, formats: tuple[str, ...], features: pa.Schema | None = None
) -> list[Output]:
    """The tables a tagging run writes (see the module docstring), in the order they finalize:
    spans after the window tags they are made from. ``features``: the feature table's schema, to
    write one beside the tags (``tag.write_features``)."""
    tag = config.tag
    hub = HubList(tag.hub_threshold, tag.hub_top_k) if "hub" in formats else None
    outputs: list[Output] = [TagOutput(tagger.schema(), tagger.names, save_dir, "json" in formats, hub)]
    if features is not None:
        outputs.append(FeatureOutput(features, write_npy=False, where=save_dir))
    if tag.segment_seconds:
        outputs.append(WindowTagOutput(tagger.schema(S.SEGMENT_SCHEMA), tagger.names))
        outputs.append(SpanOutput(tagger.names, tagger.spec.lstm.model.num_classes))
    if tag.thumbnails:
        outputs.append(ThumbnailOutput())
    return outputs


def check_formats(formats: tuple[str, ...]) -> None:
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ConfigError(f"--format takes {list(FORMATS)}, got {sorted(unknown)}")


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
    check_formats(formats)
    config = prepare_output(config, save_dir)
    sizes = R.size_pipeline(config, [tsn.need(config), lstm.tag_need(config)])
    spec = tsn.tsn_spec(config, tsn_weights, sizes.device, sizes.models[tsn.MODEL_NAME].threads)
    tsn_fingerprint, feature_dim = tsn.weights_fingerprint(config, tsn_weights)
    prov = tsn.provenance(config, tsn_fingerprint, feature_dim, spec.precision)
    tag = config.tag
    keep_timeline = bool(tag.segment_seconds) and tag.write_timeline
    actors = sizes.models[lstm.MODEL_NAME]
    tagger = build_tagger(config, lstm_weights, prov, config.output.dtype, actors, tag.write_features or keep_timeline)
    features = S.feature_schema(config.infer.seg_num, feature_dim, config.output.dtype, prov)
    outputs = tag_outputs(config, tagger, save_dir, formats, features if tag.write_features else None)
    if keep_timeline:
        made = {**prov, "timeline": segment_settings(tag)}  # how the features were made, and at which times
        outputs.append(TimelineOutput(with_metadata(S.timeline_schema(feature_dim, config.output.dtype), made)))
    job = VideoJob(
        "tagging",
        spec.device,
        entries=read_entries(manifest, config),
        stages=[
            lambda ds: decode_stage(ds, config, sizes, tagging=True),
            lambda ds: tsn.tsn_stage(ds, config, spec, sizes),
            lambda ds: lstm.tag_stage(ds, config, tagger.spec, sizes),
        ],
        outputs=outputs,
        writer_cpus=sizes.writer_cpus,
        frames_per_video=config.infer.seg_num,
    )
    return run_video_job(config, save_dir, job, retry_failed, start)


# -- tagging a feature table -------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureTable:
    """A feature table's parts, what they record, and which part holds which video."""

    uri: str  # as given
    parts: list[str]  # inside ``fs``
    provenance: dict[str, Any]
    dtype: str
    ids: pa.Array  # video ids of every row, parts in order
    uris: pa.Array
    part_of: pa.Array  # per row, its part's index in ``parts``


def open_feature_table(uri: str, config: Config) -> FeatureTable:
    """Reads a feature table's ids and uris (not its features) and the provenance of its first part."""
    fs, root = st.filesystem(uri, config.storage)
    parts = st.list_files(fs, root, ".parquet")
    if not parts:
        raise ConfigError(f"no feature table at {st.redact(uri)} (no Parquet parts)")
    schema = pq.read_schema(parts[0], filesystem=fs)
    prov = S.read_provenance(schema)
    if prov is None or S.FEATURES not in schema.names:
        raise ConfigError(f"{st.redact(uri)} is not a feature table written by jobs/extract.py (no provenance)")
    dtype = np.dtype(schema.field(S.FEATURES).type.value_type.to_pandas_dtype()).name
    tables = [pq.read_table(p, columns=[S.VIDEO_ID, S.URI], filesystem=fs) for p in parts]
    part_of = np.concatenate([np.full(t.num_rows, i, np.int32) for i, t in enumerate(tables)])
    table = pa.concat_tables(tables)
    return FeatureTable(
        uri,
        parts,
        prov,
        dtype,
        table.column(S.VIDEO_ID).combine_chunks(),
        table.column(S.URI).combine_chunks(),
        pa.array(part_of),
    )


def feature_blocks(table: FeatureTable, todo: pa.Table) -> list[pa.Table]:
    """One block per part holding videos to tag: the part, and those videos."""
    wanted = pc.is_in(table.ids, value_set=todo.column(S.VIDEO_ID))
    rows = pa.table({S.VIDEO_ID: table.ids, S.URI: table.uris, "part": table.part_of}).filter(wanted)
    blocks = []
    for index in np.unique(rows.column("part").to_numpy()):
        mine = rows.filter(pc.equal(rows.column("part"), int(index)))
        path = table.parts[int(index)]
        blocks.append(mine.drop_columns(["part"]).append_column(S.PATH, pa.array([path] * mine.num_rows)))
    return blocks


def read_feature_rows(
    batch: pa.Table, storage, uri: str, provenance: dict[str, Any], shape: tuple[int, int]
) -> pa.Table:
    """A block of (video_id, uri, path) -> video rows with the features as bytes, as the TSN stage
    hands them on; a row that cannot be used (a part that cannot be read, or made differently
    from the table's first part) becomes a failed row."""
    fs, _ = st.filesystem(uri, storage)
    path = batch.column(S.PATH)[0].as_py()
    ids = batch.column(S.VIDEO_ID)
    start = time.perf_counter()
    failure = None
    try:
        part = pq.read_table(path, filesystem=fs, columns=[S.VIDEO_ID, S.FEATURES])
        diff = S.signature_diff(S.read_provenance(part.schema) or {}, provenance)
        found = list(part.schema.field(S.FEATURES).type.shape)
        if diff:
            failure = ("read", "OtherExtractor", f"this part's features were made differently: {'; '.join(diff)}")
        elif tuple(found) != tuple(shape):
            failure = ("read", "BadShape", f"features are {found}, the table's {list(shape)}")
    except OSError as exc:
        failure = ("read", type(exc).__name__, st.redact(str(exc)))
    except pa.ArrowException as exc:
        failure = ("read", type(exc).__name__, st.redact(str(exc)))
    if failure is not None:
        message = f"{st.redact(path)}: {failure[2]}"
        return pa.table(
            {
                S.VIDEO_ID: ids,
                S.URI: batch.column(S.URI),
                S.FEATURES: pa.nulls(batch.num_rows, pa.large_binary()),
                **{k: pa.array([v] * batch.num_rows, pa.string()) for k, v in S.failure(*failure[:2], message).items()},
            }
        )
    part = part.filter(pc.is_in(part.column(S.VIDEO_ID), value_set=ids))
    where = pc.index_in(ids, value_set=part.column(S.VIDEO_ID)).to_pylist()  # a video's first row in the part
    feats = part.column(S.FEATURES).combine_chunks().to_numpy_ndarray() if part.num_rows else None
    gone = S.failure("read", "NotInTable", f"{st.redact(path)} no longer holds this video")
    seconds = (time.perf_counter() - start) / max(batch.num_rows, 1)
    return pa.table(
        {
            S.VIDEO_ID: ids,
            S.URI: batch.column(S.URI),
            S.FEATURES: pa.array([None if i is None else feats[i].tobytes() for i in where], pa.large_binary()),
            **{k: pa.array([None if i is not None else v for i in where], pa.string()) for k, v in gone.items()},
            S.READ_SECONDS: pa.array([seconds] * batch.num_rows, pa.float32()),
        }
    )


def run_tag_features(
    config: Config,
    features: str,
    save_dir: str,
    lstm_weights: str,
    formats: tuple[str, ...] = (),
    retry_failed: bool = False,
    meta: dict[str, Any] | None = None,
) -> JobSummary:
    """Tags every row of the feature table ``features`` not yet in ``save_dir``, without opening a
    video: the same ``tags/`` as tagging the videos. ``meta``: more to record in the tags' metadata
    (the nightly's model id). Needs ``ray.init()``."""
    start = time.perf_counter()
    check_formats(formats)
    if config.tag.segment_seconds or config.tag.thumbnails:
        raise ConfigError(
            "a feature table holds neither times nor frames: tag windows from a timeline table "
            "(tag.segment_seconds with --timeline), and thumbnails from the videos (tag.thumbnails)"
        )
    config = prepare_output(config, save_dir)
    table = open_feature_table(features, config)
    prov = table.provenance
    sizes = R.size_pipeline(config, [lstm.tag_need(config)])
    tagger = build_tagger(config, lstm_weights, prov, table.dtype, sizes.models[lstm.MODEL_NAME], False)
    tagger.meta.update(meta or {})
    entries = pa.table(
        {S.VIDEO_ID: table.ids, S.URI: table.uris, S.LABELS: pa.nulls(len(table.ids), pa.list_(pa.int32()))}
    ).append_column(S.SIZE_BYTES, pa.nulls(len(table.ids), pa.int64()))
    unique = pc.index_in(pc.unique(table.ids), value_set=table.ids)  # a table may hold a video twice
    entries = entries.take(unique)
    shape = (prov["sampling"]["num_segments"], prov["model"]["feature_dim"])
    job = VideoJob(
        "tagging features",
        sizes.device,
        entries=Manifest(entries, duplicates=len(table.ids) - entries.num_rows),
        stages=[
            lambda ds: map_cpu_tasks(
                ds,
                read_feature_rows,
                batch_size=None,
                num_cpus=sizes.task_cpus,
                concurrency=sizes.task_concurrency,
                max_retries=config.resources.decode_max_retries,
                fn_kwargs={"storage": config.storage, "uri": features, "provenance": prov, "shape": shape},
            ),
            lambda ds: lstm.tag_stage(ds, config, tagger.spec, sizes),
        ],
        outputs=tag_outputs(config, tagger, save_dir, formats),
        writer_cpus=sizes.writer_cpus,
        frames_per_video=shape[0],
        blocks=lambda todo: feature_blocks(table, todo),
    )
    return run_video_job(config, save_dir, job, retry_failed, start)
