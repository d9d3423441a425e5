"""Batch tagging: manifest -> decode (CPU tasks) -> TSN (actors) -> AttentionLSTM (actors) -> tags,
in one Ray Data pipeline; no feature files are written in between. Or, with ``run_tag_stores``,
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

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import vtplatform
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
from vtplatform.windows import NoWindow, windows

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
    timeline_store: str | None = None,
    meta: dict[str, Any] | None = None,
) -> JobSummary:
    """Tags every manifest video not yet in ``save_dir``. ``timeline_store``: with
    ``tag.write_timeline``, the timeline table to add to instead of ``save_dir/timeline`` (the
    nightly's store); ``meta``: more to record in the outputs' metadata. Needs ``ray.init()``."""
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
    tagger.meta.update(meta or {})
    features = S.feature_schema(config.infer.seg_num, feature_dim, config.output.dtype, prov)
    outputs = tag_outputs(config, tagger, save_dir, formats, features if tag.write_features else None)
    if keep_timeline:
        made = {**prov, "timeline": segment_settings(tag)}  # how the features were made, and at which times
        schema = with_metadata(S.timeline_schema(feature_dim, config.output.dtype), made)
        outputs.append(TimelineOutput(schema, timeline_store, config.storage))
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


# -- tagging from the stores: a feature table, a timeline table -------------------------------------


@dataclass(frozen=True)
class Store:
    """A stored table a new AttentionLSTM can tag from: its parts, how its features were made
    (``made``: their provenance, and for a timeline its settings), and per video the parts that
    hold it (``videos``: video_id, uri, part, frames: one row per video and part)."""

    uri: str
    parts: list[str]
    made: dict[str, Any]
    dtype: str
    dim: int
    videos: pa.Table


def open_store(uri: str, config: Config, what: str) -> Store:
    """Reads a feature or timeline table's ids (not its features) and the metadata of its first part;
    refuses a table that is not one, or (a timeline) one that does not record where videos end."""
    fs, root = st.filesystem(uri, config.storage)
    parts = st.list_files(fs, root, ".parquet")
    if not parts:
        raise ConfigError(f"no {what} table at {st.redact(uri)} (no Parquet parts)")
    schema = pq.read_schema(parts[0], filesystem=fs)
    made = S.read_provenance(schema)
    if made is None or S.FEATURES not in schema.names:
        raise ConfigError(f"{st.redact(uri)} is not a {what} table written by vtplatform (no provenance)")
    if what == "timeline" and (
        S.VIDEO_END_S not in schema.names or S.URI not in schema.names or "timeline" not in made
    ):
        raise ConfigError(
            f"{st.redact(uri)} does not record where its videos end (a timeline table from before vtplatform "
            f"{vtplatform.__version__}): tag those videos with --segments from the videos"
        )
    tensor = schema.field(S.FEATURES).type
    dtype = np.dtype(tensor.value_type.to_pandas_dtype()).name
    tables = []
    for i, path in enumerate(parts):
        ids = pq.read_table(path, columns=[S.VIDEO_ID, S.URI], filesystem=fs)
        counts = ids.group_by([S.VIDEO_ID, S.URI]).aggregate([([], "count_all")])
        tables.append(counts.append_column("part", pa.array([i] * counts.num_rows, pa.int32())))
    videos = pa.concat_tables(tables).rename_columns([S.VIDEO_ID, S.URI, "frames", "part"])
    return Store(uri, parts, made, dtype, int(tensor.shape[-1]), videos)


def check_timeline(store: Store, tag) -> None:
    """Refuses windows the timeline cannot serve: another frame rate than it was made at, or windows
    shorter than its frame interval (they would hold no frame)."""
    recorded = store.made["timeline"]["timeline_fps"]
    if abs(recorded - tag.timeline_fps) > 1e-9:
        raise ConfigError(
            f"{st.redact(store.uri)} holds TSN features at {recorded:g} frames/s, tag.timeline_fps is "
            f"{tag.timeline_fps:g}: set -o tag.timeline_fps={recorded:g}, or tag the videos with --segments"
        )
    if tag.segment_seconds * recorded < 1:
        raise ConfigError(
            f"windows of {tag.segment_seconds:g} s need frames {st.redact(store.uri)} lacks (it holds one every "
            f"{1 / recorded:g} s): use --segments of at least {1 / recorded:g}"
        )


def store_blocks(todo: pa.Table, features: Store | None, timeline: Store | None, videos_per_task: int, frames: int):
    """The read tasks' blocks: videos to tag with the parts that hold them (``feature_part``, the
    ``timeline_parts``), grouped by the parts they read, at most ``videos_per_task`` videos and about
    ``frames`` timeline frames a block."""
    table = todo.select([S.VIDEO_ID, S.URI])
    part = pa.nulls(table.num_rows, pa.string())
    if features is not None:
        first = features.videos.group_by(S.VIDEO_ID).aggregate([("part", "min")])
        where = pc.index_in(table.column(S.VIDEO_ID), value_set=first.column(S.VIDEO_ID))
        index = pc.take(first.column("part_min"), where)
        part = pa.array([None if i is None else features.parts[i] for i in index.to_pylist()], pa.string())
    table = table.append_column("feature_part", part)
    lists: list = [[] for _ in range(table.num_rows)]
    counts = np.zeros(table.num_rows, np.int64)
    if timeline is not None:
        rows = timeline.videos.filter(pc.is_in(timeline.videos.column(S.VIDEO_ID), value_set=table.column(S.VIDEO_ID)))
        position = {v: i for i, v in enumerate(table.column(S.VIDEO_ID).to_pylist())}
        for vid, n, i in zip(*(rows.column(c).to_pylist() for c in (S.VIDEO_ID, "frames", "part")), strict=True):
            lists[position[vid]].append(timeline.parts[i])
            counts[position[vid]] += n
    table = table.append_column("timeline_parts", pa.array(lists, pa.list_(pa.string())))
    table = table.append_column(S.TIMELINE_FRAMES, pa.array(counts, pa.int64()))
    key = [p or "" for p in table.column("feature_part").to_pylist()]
    key2 = [sorted(ps)[0] if ps else "" for ps in lists]
    table = table.take(pa.array(np.lexsort((key2, key)) if table.num_rows else [], pa.int64()))
    blocks, start, total = [], 0, 0
    sizes = table.column(S.TIMELINE_FRAMES).to_pylist()
    for i, n in enumerate(sizes):
        if i > start and (i - start >= videos_per_task or total + n > frames):
            blocks.append(table.slice(start, i - start))
            start, total = i, 0
        total += n
    if table.num_rows > start:
        blocks.append(table.slice(start))
    return blocks


@dataclass(frozen=True)
class StoreRead:
    """What a read task needs to turn a block (``store_blocks``) into the rows tagging takes."""

    storage: Any
    features: dict[str, Any] | None  # provenance of the feature table, shape
    timeline: dict[str, Any] | None  # its dtype and dim
    windows: tuple[float, float, int] | None  # segment seconds, stride, timeline frames a chunk row
    shape: tuple[int, int] | None  # the feature table's (segments, dim)


def read_store_rows(block: pa.Table, read: StoreRead) -> pa.Table:
    """A block of videos -> each video's timeline chunk rows (its windows over the stored timeline,
    as the decode stage makes them) and its own row (its stored features, or null without a feature
    table), ``schema.ROW_SCHEMA``-like. A video whose stored rows cannot be used is a failed row."""
    start = time.perf_counter()
    ids = block.column(S.VIDEO_ID)
    feats, failures = {}, {}
    if read.features is not None:
        feats, failures = _stored_features(block, read)
    frames = _stored_timelines(block, read) if read.timeline is not None else {}
    rows: list[dict] = []
    for vid, uri in zip(ids.to_pylist(), block.column(S.URI).to_pylist(), strict=True):
        failure = failures.get(vid)
        chunks: list[dict] = []
        if failure is None and read.timeline is not None:
            if vid not in frames:
                failure = S.failure("read", "NotInTimeline", "the timeline table holds no frame of this video")
            else:
                try:
                    chunks = _window_chunks(vid, uri, *frames[vid], read)
                except NoWindow as exc:
                    failure = S.failure("decode", "NoWindows", f"the stored timeline: {exc}")
        rows += [c | {S.ROW_KIND: S.CHUNK_ROWS} for c in chunks] if failure is None else []
        row = {S.VIDEO_ID: vid, S.URI: uri, S.ROW_KIND: S.VIDEO_ROWS}
        rows.append(row | (failure or {S.FEATURES: feats.get(vid)}))
    seconds = (time.perf_counter() - start) / max(len(rows), 1)
    for row in rows:
        row[S.READ_SECONDS] = seconds
    return pa.Table.from_pylist(rows, schema=S.STORE_ROW_SCHEMA)


def _stored_features(block: pa.Table, read: StoreRead) -> tuple[dict[str, bytes], dict[str, dict]]:
    """{video: its features as bytes} from the feature parts, and {video: failure} for parts that
    cannot be read or were made differently from the table's first part."""
    out, failures = {}, {}
    for path in sorted({p for p in block.column("feature_part").to_pylist() if p}):
        ids = block.filter(pc.equal(block.column("feature_part"), path)).column(S.VIDEO_ID)
        fs, _ = st.filesystem(read.features["uri"], read.storage)
        try:
            part = pq.read_table(path, filesystem=fs, columns=[S.VIDEO_ID, S.FEATURES])
        except (OSError, pa.ArrowException) as exc:
            failure = S.failure("read", type(exc).__name__, st.redact(f"{path}: {exc}"))
            failures.update(dict.fromkeys(ids.to_pylist(), failure))
            continue
        diff = S.signature_diff(S.read_provenance(part.schema) or {}, read.features["provenance"])
        found = tuple(part.schema.field(S.FEATURES).type.shape)
        if diff or found != tuple(read.shape):
            why = "; ".join(diff) or f"features are {list(found)}, the table's {list(read.shape)}"
            failure = S.failure("read", "OtherExtractor", st.redact(f"{path} was made differently: {why}"))
            failures.update(dict.fromkeys(ids.to_pylist(), failure))
            continue
        part = part.filter(pc.is_in(part.column(S.VIDEO_ID), value_set=ids))
        arrays = part.column(S.FEATURES).combine_chunks().to_numpy_ndarray()
        for vid, array in zip(part.column(S.VIDEO_ID).to_pylist(), arrays, strict=True):
            out.setdefault(vid, array.tobytes())  # a video twice in a part: its first row
    for vid, path in zip(block.column(S.VIDEO_ID).to_pylist(), block.column("feature_part").to_pylist(), strict=True):
        if vid not in out and vid not in failures:
            failures[vid] = S.failure("read", "NotInTable", f"{st.redact(str(path))} holds no features of this video")
    return out, failures


def _stored_timelines(block: pa.Table, read: StoreRead) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """{video: (times, features (frames, dim), where it ends)} from the timeline parts the block names."""
    paths = sorted({p for ps in block.column("timeline_parts").to_pylist() for p in ps})
    ids = block.column(S.VIDEO_ID)
    fs, _ = st.filesystem(read.timeline["uri"], read.storage)
    columns = [S.VIDEO_ID, S.T_SECONDS, S.FEATURES, S.VIDEO_END_S]
    tables = [pq.read_table(p, filesystem=fs, columns=columns) for p in paths]
    table = pa.concat_tables([t.filter(pc.is_in(t.column(S.VIDEO_ID), value_set=ids)) for t in tables])
    table = table.sort_by([(S.VIDEO_ID, "ascending"), (S.T_SECONDS, "ascending")])
    out = {}
    vids = table.column(S.VIDEO_ID).to_numpy(zero_copy_only=False)
    bounds = np.flatnonzero(np.r_[True, vids[1:] != vids[:-1], True]) if len(vids) else []
    for lo, hi in itertools.pairwise(bounds):
        rows = table.slice(lo, hi - lo)
        times = rows.column(S.T_SECONDS).to_numpy()
        feats = rows.column(S.FEATURES).combine_chunks().to_numpy_ndarray()
        ends = [e for e in rows.column(S.VIDEO_END_S).to_pylist() if e is not None]
        out[str(vids[lo])] = (times, feats, max(ends) if ends else float(times[-1]))
    return out


def _window_chunks(vid: str, uri: str, times: np.ndarray, feats: np.ndarray, end: float, read: StoreRead) -> list[dict]:
    """One video's windows over its stored timeline (``windows.windows``: the same as the decode stage's
    ``chunk_windows``), in chunk rows of whole windows, about ``chunk`` frames each."""
    segment_s, stride_s, chunk = read.windows
    grid = windows(times, segment_s, stride_s, end)
    if not grid:
        raise NoWindow("no window holds a timeline frame")
    groups, current = [], []
    for w in grid:
        if current and max(x.frames.stop for x in [*current, w]) - current[0].frames.start > chunk:
            groups.append(current)
            current = []
        current.append(w)
    groups.append(current)
    rows = []
    for index, group in enumerate(groups):
        lo, hi = group[0].frames.start, max(w.frames.stop for w in group)
        last = index + 1 == len(groups)
        rows.append(
            {
                S.VIDEO_ID: vid,
                S.URI: uri,
                S.FEATURES: feats[lo:hi].tobytes(),
                S.NUM_FRAMES: hi - lo,
                S.CHUNK: index,
                S.LAST_CHUNK: last,
                S.VIDEO_END_S: end if last else None,
                S.NEW_FROM: 0,
                S.T_SECONDS: times[lo:hi].tolist(),
                S.WIN_INDEX: [w.index for w in group],
                S.WIN_START: [w.start_s for w in group],
                S.WIN_END: [w.end_s for w in group],
                S.WIN_LO: [w.frames.start - lo for w in group],
                S.WIN_HI: [w.frames.stop - lo for w in group],
                S.TIMELINE_FRAMES: hi - lo,
                S.WINDOWS: len(group),
            }
        )
    return rows


def run_tag_stores(
    config: Config,
    save_dir: str,
    lstm_weights: str,
    features: str | None = None,
    timeline: str | None = None,
    formats: tuple[str, ...] = (),
    retry_failed: bool = False,
    meta: dict[str, Any] | None = None,
) -> JobSummary:
    """Tags from the stores, with no video opened: ``tags/`` from the feature table ``features``
    (every row not yet in ``save_dir``), and with ``tag.segment_seconds`` the window tags and spans
    from the timeline table ``timeline``; the same tables as tagging the videos. Given both, a
    video needs both. ``meta``: more to record in the outputs' metadata (the nightly's model id).
    Needs ``ray.init()``."""
    start = time.perf_counter()
    check_formats(formats)
    tag = config.tag
    if tag.thumbnails:
        raise ConfigError("thumbnails need the videos (tag.thumbnails): the stores hold no frames")
    if timeline is not None and not tag.segment_seconds:
        raise ConfigError("--timeline tags windows: give their length with --segments (tag.segment_seconds)")
    if timeline is None and tag.segment_seconds:
        raise ConfigError("windows need the timeline table (--timeline): a feature table holds no times")
    if features is None and timeline is None:
        raise ConfigError("tagging from the stores needs --features, --timeline, or both")
    config = prepare_output(config, save_dir)
    stores = {k: open_store(u, config, k) for k, u in (("features", features), ("timeline", timeline)) if u}
    if "timeline" in stores:
        check_timeline(stores["timeline"], tag)
    base = stores.get("features") or stores["timeline"]
    prov = {k: v for k, v in base.made.items() if k != "timeline"}
    sizes = R.size_pipeline(config, [lstm.tag_need(config)])
    tagger = build_tagger(config, lstm_weights, prov, base.dtype, sizes.models[lstm.MODEL_NAME], False)
    tagger.meta.update(meta or {})
    outputs = tag_outputs(config, tagger, save_dir, formats)
    if "features" not in stores:  # windows only: the video-level tags need the 300 sampled frames
        outputs = [o for o in outputs if o.directory != S.TAGS_DIR]
    videos = base.videos.group_by([S.VIDEO_ID]).aggregate([(S.URI, "min")]).rename_columns([S.VIDEO_ID, S.URI])
    entries = videos.append_column(S.LABELS, pa.nulls(videos.num_rows, pa.list_(pa.int32())))
    entries = entries.append_column(S.SIZE_BYTES, pa.nulls(videos.num_rows, pa.int64()))
    shape = (prov["sampling"]["num_segments"], prov["model"]["feature_dim"])
    read = StoreRead(
        config.storage,
        {"uri": features, "provenance": prov} if features else None,
        {"uri": timeline} if timeline else None,
        (tag.segment_seconds, tag.segment_stride_seconds or tag.segment_seconds, tag.timeline_chunk_frames)
        if timeline
        else None,
        shape,
    )
    res = config.resources
    job = VideoJob(
        "tagging from stores",
        sizes.device,
        entries=Manifest(entries),
        stages=[
            lambda ds: map_cpu_tasks(
                ds,
                read_store_rows,
                batch_size=None,
                num_cpus=sizes.task_cpus,
                concurrency=sizes.task_concurrency,
                max_retries=res.decode_max_retries,
                fn_kwargs={"read": read},
            ),
            lambda ds: lstm.tag_stage(ds, config, tagger.spec, sizes),
        ],
        outputs=outputs,
        writer_cpus=sizes.writer_cpus,
        frames_per_video=shape[0],
        blocks=lambda todo: store_blocks(
            todo, stores.get("features"), stores.get("timeline"), res.decode_batch_size, STORE_FRAMES_PER_TASK
        ),
    )
    return run_video_job(config, save_dir, job, retry_failed, start)


STORE_FRAMES_PER_TASK = (
    8192  # timeline frames a read task holds at most (about 32 MB at 2048 float16), unless one video has more
)
