"""The data contract: column names, the Arrow schemas of every table, and provenance metadata.

Every stage imports its columns from here. The feature table stores ``features`` as Arrow's
canonical ``fixed_shape_tensor`` extension type, which plain pyarrow reads back as
``[num_segments, feature_dim]`` arrays without Ray::

    table = pyarrow.parquet.read_table("OUT/features")
    feats = table["features"].combine_chunks().to_numpy_ndarray()   # (rows, seg, dim)
    one = table["features"][0].to_numpy()                             # (seg, dim)

pandas sees each cell as the flat values; ``features_from_pandas`` reshapes them with the
shape recorded in the type.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

MODEL_TSN = "TSN"  # the model names configs, checkpoints and actor stages use
MODEL_ATTENTION_LSTM = "AttentionLSTM"
MODEL_NAMES = (MODEL_TSN, MODEL_ATTENTION_LSTM)  # the models jobs run (vtplatform.catalog has each one's jobs)
SCHEMA_VERSION = 1
METADATA_KEY = b"vtplatform"

# Folders under a job's OUT (extraction, tagging, prediction, the frame cache, evaluation) and
# under a model registry.
FEATURES_DIR = "features"
DEAD_LETTERS_DIR = "dead_letters"
NPY_DIR = "npy"
RUNS_DIR = "runs"  # one JSON summary per run
TAGS_DIR = "tags"
PREDICTIONS_DIR = "predictions"
JSON_DIR = "json"  # the seed's per-video JSON predictions
FRAMES_DIR = "frames"  # frame cache: the frames
INDEX_DIR = "index"  # frame cache: one row per video
MODELS_DIR = "models"  # registry: one folder per registered model
HISTORY_DIR = "history"  # registry: champion changes
TIMELINE_DIR = "timeline"  # tagging with segments: per-frame TSN features at tag.timeline_fps
SEGMENTS_DIR = "segments"  # tagging with segments: top-k tags per window
SPANS_DIR = "spans"  # tagging with segments: windows of one label merged into time spans
THUMBNAILS_DIR = "thumbnails"  # small JPEGs: <video>.jpg per video, <video>/<window>.jpg per window
REPORT_DIR = "report"  # jobs/report.py's default output under a tags OUT
REPORT_FILE = "report.json"  # evaluation: the metrics
RUN_STATE_FILE = "state.json"  # registry: a nightly run's state, under runs/<run_id>/
CHAMPION_FILE = "champion.json"  # registry: the current champion
CURRENT_TAGS_FILE = "current.json"  # registry: which model's tags folder holds the whole library's tags
EVAL_DIR = "eval"  # registry: a nightly run's evaluations, under runs/<run_id>/
HUB_FILE = "hub_results.json"  # tagging with --format hub
INDEX_FILE = "index.html"  # jobs/report.py's page
CACHE_SETTINGS_FILE = "cache.json"  # frame cache: the settings every reader checks
EXPORT_TSN_DIR = "tsn"  # serving export: the TSN model
EXPORT_LSTM_DIR = "attention_lstm"  # serving export: the AttentionLSTM model

# A checkpoint folder and a training run folder (train.checkpoint, train.scaffold).
MODEL_FILE = "model.pdparams"
META_FILE = "meta.json"  # a checkpoint's config, epoch, step, metrics, model name
OPTIMIZER_FILE = "optimizer.npz"
BEST_DIR = "best"  # a run's copy of its best checkpoint
TENSORBOARD_DIR = "tensorboard"  # the chief worker's event files
CURVES_FILE = "curves.png"
HISTORY_FILE = "history.json"

# Identity columns, shared by every table.
VIDEO_ID = "video_id"
URI = "uri"
LABELS = "labels"

# Feature table.
FEATURES = "features"
NUM_FRAMES = "num_frames"
FRAME_INDICES = "frame_indices"
FPS = "fps"
WIDTH = "width"
HEIGHT = "height"
DECODER = "decoder"

# Dead letters (and the error columns that travel with rows between stages).
STAGE = "stage"
ERROR_TYPE = "error_type"
MESSAGE = "message"
FAILED_AT = "failed_at"

# Between stages only.
FRAMES = "frames"  # raw (seg, 224, 224, 3) uint8 crops, as bytes
DECODE_SECONDS = "decode_seconds"  # per-video busy time of each stage, summed for the summary
PREPROCESS_SECONDS = "preprocess_seconds"  # the decode task's RGB conversion, scale and crop (not in decode_seconds)
READ_SECONDS = "read_seconds"  # tagging from the stores: reading a video's stored features
INFER_SECONDS = "infer_seconds"
TAG_SECONDS = "tag_seconds"
TSN_PEAK_MB = "tsn_peak_mb"  # the TSN actor's memory growth over the loaded model, at its highest (MB)
TSN_CALL_MB = "tsn_call_mb"  # the most one TSN call added to the actor's memory (MB)
LSTM_PEAK_MB = "lstm_peak_mb"  # the same two of the tagging AttentionLSTM actor
LSTM_CALL_MB = "lstm_call_mb"
LOAD_SECONDS = "load_seconds"  # TSN training and evaluation: loading one sample
EPOCH = "epoch"  # TSN training: the epoch whose random draws a sample uses
PATH = "path"  # the seed's layout: a row's .npy feature file
STEPS = "steps"  # the seed's layout: the time steps in a row's .npy file
LOGITS = "logits"  # AttentionLSTM inference, before the sigmoid
LOSS = "loss"  # AttentionLSTM evaluation: a video's loss
LABEL_PROB = "label_prob"  # TSN evaluation: the probability of the true label

# Predictions.
LIST_INDEX = "list_index"  # between stages: a video's place in the input list (the seed's result<i>.json)
CLASS_IDS = "class_ids"
CLASS_NAMES = "class_names"
PROBS = "probs"

STAGES = ("manifest", "read", "decode", "infer")

SIZE_BYTES = "size_bytes"  # of the video file, where a listing gave it (null: unknown)

MANIFEST_SCHEMA = pa.schema(
    [(VIDEO_ID, pa.string()), (URI, pa.string()), (LABELS, pa.list_(pa.int32())), (SIZE_BYTES, pa.int64())]
)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        (VIDEO_ID, pa.string()),
        (URI, pa.string()),
        (STAGE, pa.string()),
        (ERROR_TYPE, pa.string()),
        (MESSAGE, pa.string()),
        (FAILED_AT, pa.timestamp("ms", tz="UTC")),
    ]
)
MESSAGE_CHARS = 2000  # a failure's message is cut to this many characters


def failure(stage: str, error_type: str, message: str) -> dict[str, str]:
    """The failure columns of a row that failed at ``stage``: null on good rows, and what a dead
    letter keeps. ``message`` should be redacted (``storage.redact``) by the caller."""
    return {STAGE: stage, ERROR_TYPE: error_type, MESSAGE: message[:MESSAGE_CHARS]}


# Time-localized tagging (``jobs/tag.py --segments``). Times are seconds from the stream's
# presentation timestamps, so variable-frame-rate files are right.
T_SECONDS = "t_seconds"
START_S = "start_s"
END_S = "end_s"
WINDOW = "window"  # a window's index in its video, from 0
CLASS_ID = "class_id"
NAME = "name"
LABEL_PROBS = "label_probs"
CHUNK = "chunk"  # which decode chunk of its video a row came from, from 0 (null: the video's own row)
LAST_CHUNK = "last_chunk"  # the video's last chunk: with chunks 0..this one all present, it is complete
MAX_PROB = "max_prob"
MEAN_PROB = "mean_prob"

# Rows travel between stages as a tagged union: every row says its kind (``ROW_KIND``), a video's
# own row (``VIDEO_ROWS``: its sampled crops, then features, then tags) or, when tagging with
# segments, a chunk of a video's timeline (``CHUNK_ROWS``). Ray Data may gather rows of both kinds
# in one block, so a block has every column of ``ROW_SCHEMA`` (those of the other kind null) and a
# stage that treats the kinds apart goes by ``ROW_KIND``; ``split_rows`` gives each kind's rows
# with its own columns only, which is what the writer hands the outputs taking that kind. A job's
# per-video result rows without ``ROW_KIND`` (the frame cache, predictions) are video rows.
ROW_KIND = "row_kind"
VIDEO_ROWS = "video"
CHUNK_ROWS = "chunk"
FAILED_ROWS = "failed"  # what the dead letters take: the rows that failed, of any kind

THUMBNAIL = "thumbnail"  # the video's own JPEG, on its own row (--thumbnails)

# The columns of a video's row out of the decode stage. Failed rows carry the error columns and a
# null ``frames``.
CLIP_SCHEMA = pa.schema(
    [
        (VIDEO_ID, pa.string()),
        (URI, pa.string()),
        (FRAMES, pa.large_binary()),
        (NUM_FRAMES, pa.int32()),
        (FRAME_INDICES, pa.list_(pa.int32())),
        (FPS, pa.float32()),
        (WIDTH, pa.int32()),
        (HEIGHT, pa.int32()),
        (DECODER, pa.string()),
        (STAGE, pa.string()),
        (ERROR_TYPE, pa.string()),
        (MESSAGE, pa.string()),
        (DECODE_SECONDS, pa.float32()),
        (PREPROCESS_SECONDS, pa.float32()),
        (THUMBNAIL, pa.binary()),
    ]
)

# The columns of a timeline chunk row: ``frames`` holds the chunk's timeline crops at
# ``T_SECONDS``; the windows whose frames it holds are ``frames[WIN_LO[i]:WIN_HI[i]]``; frames
# before ``NEW_FROM`` were in the chunk before too (overlapping windows). The AttentionLSTM adds the
# ``WIN_*`` tags (``WINDOW_TAG_FIELDS``). A chunk never fails on its own: a video whose timeline
# fails is a failed video row.
NEW_FROM = "new_from"
WIN_INDEX = "win_index"
WIN_START = "win_start"
WIN_END = "win_end"
WIN_LO = "win_lo"
WIN_HI = "win_hi"
WIN_THUMBS = "win_thumbs"  # a JPEG per window (--thumbnails)
TIMELINE_FRAMES = "timeline_frames"  # counted in the job summary
WINDOWS = "windows"
VIDEO_END_S = "video_end_s"  # on a video's last chunk: where its timeline ends (the end its windows run to)
CHUNK_FIELDS = [
    pa.field(CHUNK, pa.int32()),
    pa.field(LAST_CHUNK, pa.bool_()),
    pa.field(VIDEO_END_S, pa.float64()),
    pa.field(NEW_FROM, pa.int32()),
    pa.field(T_SECONDS, pa.list_(pa.float64())),
    pa.field(WIN_INDEX, pa.list_(pa.int32())),
    pa.field(WIN_START, pa.list_(pa.float64())),
    pa.field(WIN_END, pa.list_(pa.float64())),
    pa.field(WIN_LO, pa.list_(pa.int32())),
    pa.field(WIN_HI, pa.list_(pa.int32())),
    pa.field(WIN_THUMBS, pa.list_(pa.binary())),
    pa.field(TIMELINE_FRAMES, pa.int32()),
    pa.field(WINDOWS, pa.int32()),
]
SHARED_COLUMNS = (
    VIDEO_ID,
    URI,
    FRAMES,
    NUM_FRAMES,
    FPS,
    DECODER,
    STAGE,
    ERROR_TYPE,
    MESSAGE,
    DECODE_SECONDS,
    PREPROCESS_SECONDS,
)
CHUNK_SCHEMA = pa.schema([CLIP_SCHEMA.field(n) for n in SHARED_COLUMNS] + CHUNK_FIELDS)
# What the decode stage yields: the union, each row's kind in ROW_KIND.
ROW_SCHEMA = pa.schema([*CLIP_SCHEMA, *CHUNK_FIELDS, pa.field(ROW_KIND, pa.string())])

VIDEO_TAG_FIELDS = [  # the tags the AttentionLSTM adds to a video's row
    pa.field(CLASS_IDS, pa.list_(pa.int32())),
    pa.field(PROBS, pa.list_(pa.float32())),
    pa.field(LABELS, pa.list_(pa.int32())),
]
WIN_CLASS_IDS = "win_class_ids"
WIN_PROBS = "win_probs"
WIN_LABELS = "win_labels"
WIN_LABEL_PROBS = "win_label_probs"
WINDOW_TAG_FIELDS = [
    pa.field(WIN_CLASS_IDS, pa.list_(pa.list_(pa.int32()))),
    pa.field(WIN_PROBS, pa.list_(pa.list_(pa.float32()))),
    pa.field(WIN_LABELS, pa.list_(pa.list_(pa.int32()))),
    pa.field(WIN_LABEL_PROBS, pa.list_(pa.list_(pa.float32()))),
]

# What tagging from the stores (a feature table, a timeline table) hands the AttentionLSTM: the rows
# the TSN stage would, their features read from the stores as bytes, not computed.
STORE_ROW_SCHEMA = pa.schema(
    [f for f in ROW_SCHEMA if f.name not in (FRAMES, DECODE_SECONDS, PREPROCESS_SECONDS)]
    + [pa.field(FEATURES, pa.large_binary()), pa.field(READ_SECONDS, pa.float32())]
)

# The columns only one kind of row has (the others are shared: ``SHARED_COLUMNS``, and what the
# model stages add to every row: features, per-row seconds and memory).
KIND_COLUMNS = {
    VIDEO_ROWS: {FRAME_INDICES, WIDTH, HEIGHT, THUMBNAIL} | {f.name for f in VIDEO_TAG_FIELDS},
    CHUNK_ROWS: {f.name for f in CHUNK_FIELDS} | {f.name for f in WINDOW_TAG_FIELDS},
}


def split_rows(table: pa.Table) -> dict[str, pa.Table]:
    """A block's rows by kind, each kind's with its own columns only (not the other kind's, not
    ``ROW_KIND``); kinds without rows are left out. Rows without ``ROW_KIND`` are video rows."""
    if ROW_KIND not in table.column_names:
        return {VIDEO_ROWS: table} if table.num_rows else {}
    import pyarrow.compute as pc

    out = {}
    for kind, other in ((VIDEO_ROWS, CHUNK_ROWS), (CHUNK_ROWS, VIDEO_ROWS)):
        rows = table.filter(pc.equal(table.column(ROW_KIND), kind))
        if rows.num_rows:
            out[kind] = rows.drop_columns([c for c in rows.column_names if c in KIND_COLUMNS[other] or c == ROW_KIND])
    return out


PREDICTION_SCHEMA = pa.schema(
    [
        (VIDEO_ID, pa.string()),
        (URI, pa.string()),
        (CLASS_IDS, pa.list_(pa.int32())),
        (CLASS_NAMES, pa.list_(pa.string())),
        (PROBS, pa.list_(pa.float32())),
    ]
)


def feature_schema(num_segments: int, feature_dim: int, dtype: str, provenance: dict[str, Any]) -> pa.Schema:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    schema = pa.schema(
        [
            (VIDEO_ID, pa.string()),
            (URI, pa.string()),
            (FEATURES, pa.fixed_shape_tensor(value_type, [num_segments, feature_dim])),
            (NUM_FRAMES, pa.int32()),
            (FRAME_INDICES, pa.list_(pa.int32(), num_segments)),
            (FPS, pa.float32()),
            (WIDTH, pa.int32()),
            (HEIGHT, pa.int32()),
            (DECODER, pa.string()),
        ]
    )
    return schema.with_metadata({METADATA_KEY: json.dumps(provenance, sort_keys=True).encode()})


def binary_views(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """Each value of a (large) binary column as a uint8 array viewing the column's own buffer, no
    copy (None for nulls): how a stage reads a block's crops from the object store without holding
    them twice."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray | None] = []
    for chunk in chunks:
        _, offsets, data = chunk.buffers()
        wide = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        ends = np.frombuffer(offsets, wide)[chunk.offset : chunk.offset + len(chunk) + 1]
        raw = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        out += [raw[ends[i] : ends[i + 1]] if valid[i] else None for i in range(len(chunk))]
    return out


def features_array(features: np.ndarray, dtype: str) -> pa.ExtensionArray:
    """(rows, seg, dim) -> a ``fixed_shape_tensor`` column of the table's dtype."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(features, dtype=dtype))


def read_provenance(schema: pa.Schema) -> dict[str, Any] | None:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def features_from_pandas(cell: np.ndarray, schema: pa.Schema) -> np.ndarray:
    """One pandas cell of ``features`` (flat values) -> its (seg, dim) array."""
    return np.asarray(cell).reshape(schema.field(FEATURES).type.shape)


# Provenance keys that do not change what the features mean.
_VOLATILE = ("created_at", "vtplatform_version")


def extractor_signature(provenance: dict[str, Any]) -> dict[str, Any]:
    """The part of the provenance that must match for two feature sets to be interchangeable."""
    return {k: v for k, v in provenance.items() if k not in _VOLATILE}


def signature_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    sa, sb = extractor_signature(a), extractor_signature(b)
    return [f"{k}: {sa.get(k)!r} != {sb.get(k)!r}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]


# Decoded-frame cache (``frame_cache.py``): frames shards plus an index, one row per video.
# Frames are stored after VideoTag's short-side scaling, before any crop: one Parquet row per
# kept frame, each video's frames in order and in row groups of their own.
POSITION = "position"  # the frame's place in the video's pool (0..pool_size-1)
FRAME_INDEX = "frame_index"  # the decoded frame it is (index into all decoded frames)
DATA = "data"  # JPEG bytes, or raw (height, width, 3) uint8 bytes
LABEL = "label"  # one class id (TSN); -1 when unknown
POOL_SIZE = "pool_size"  # frames kept for the video (num_frames unless frame_cache.keep_frames)
SHARD = "shard"  # the frames file, relative to the cache root
FIRST_ROW_GROUP = "first_row_group"

FRAME_CACHE_FRAMES_SCHEMA = pa.schema(
    [(VIDEO_ID, pa.string()), (POSITION, pa.int32()), (FRAME_INDEX, pa.int32()), (DATA, pa.large_binary())]
)

FRAME_CACHE_INDEX_SCHEMA = pa.schema(
    [
        (VIDEO_ID, pa.string()),
        (URI, pa.string()),
        (LABEL, pa.int32()),
        (NUM_FRAMES, pa.int32()),
        (POOL_SIZE, pa.int32()),
        (HEIGHT, pa.int32()),  # of the stored (scaled) frames
        (WIDTH, pa.int32()),
        (FPS, pa.float32()),
        (DECODER, pa.string()),
        (SHARD, pa.string()),
        (FIRST_ROW_GROUP, pa.int32()),
    ]
)


# Training and evaluation labels (AttentionLSTM): one row per video, keyed by video_id or uri
# (either may be null), with its class ids; a seed list file reads into the same shape.
LABEL_SCHEMA = pa.schema([(VIDEO_ID, pa.string()), (URI, pa.string()), (LABELS, pa.list_(pa.int32()))])

# Between the AttentionLSTM's data stage and its workers (numpy batches).
LENGTH = "length"  # valid time steps of ``features``
TARGETS = "targets"  # multi-hot (num_classes,) uint8

# PREDICTION_SCHEMA holds the top-k per video, best first; its metadata records the model and
# the label file's fingerprint under METADATA_KEY.

# Tags (``jobs/tag.py``): the top-k as in PREDICTION_SCHEMA, plus every class at or above the
# tagging threshold. Metadata (METADATA_KEY) records both models' weights, the threshold, the
# top-k and the label file's fingerprint.
LABEL_NAMES = "label_names"

TAG_SCHEMA = pa.schema(
    [
        *PREDICTION_SCHEMA,
        (LABELS, pa.list_(pa.int32())),
        (LABEL_NAMES, pa.list_(pa.string())),
    ]
)


SEGMENT_SCHEMA = pa.schema(
    [
        (VIDEO_ID, pa.string()),
        (URI, pa.string()),
        (WINDOW, pa.int32()),
        (START_S, pa.float64()),
        (END_S, pa.float64()),
        (CLASS_IDS, pa.list_(pa.int32())),
        (CLASS_NAMES, pa.list_(pa.string())),
        (PROBS, pa.list_(pa.float32())),
        (LABELS, pa.list_(pa.int32())),  # the classes at or above tag.threshold, best first
        (LABEL_PROBS, pa.list_(pa.float32())),  # their probabilities
        (CHUNK, pa.int32()),  # bookkeeping for resume: which decode chunk held the window
        (LAST_CHUNK, pa.bool_()),
    ]
)

SPAN_SCHEMA = pa.schema(
    [
        (VIDEO_ID, pa.string()),
        (CLASS_ID, pa.int32()),
        (NAME, pa.string()),
        (START_S, pa.float64()),
        (END_S, pa.float64()),
        (MAX_PROB, pa.float32()),
        (MEAN_PROB, pa.float32()),
    ]
)


def timeline_schema(feature_dim: int, dtype: str = "float16") -> pa.Schema:
    """``timeline/``: one row per timeline frame, its TSN features as a ``(dim,)`` tensor; the rows of
    a video's last chunk also say where the video ends (``VIDEO_END_S``, what its windows run to)."""
    return pa.schema(
        [
            (VIDEO_ID, pa.string()),
            (T_SECONDS, pa.float64()),
            (FEATURES, pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), (feature_dim,))),
            (VIDEO_END_S, pa.float64()),
            (URI, pa.string()),
        ]
    )


# TSN training and evaluation (tsn_data): one row per sample to load, a video and the epoch
# whose random draws it uses.
SAMPLE_SCHEMA = pa.schema(
    [
        (VIDEO_ID, pa.string()),
        (URI, pa.string()),
        (LABEL, pa.int32()),
        (NUM_FRAMES, pa.int32()),  # known for frames-layout lists and cached videos; -1 otherwise
        (EPOCH, pa.int32()),
        (SHARD, pa.string()),  # the frame-cache shard holding the video, or null
        (FIRST_ROW_GROUP, pa.int32()),
        (POOL_SIZE, pa.int32()),
        (HEIGHT, pa.int32()),
        (WIDTH, pa.int32()),
    ]
)

# What TSN's load stage hands on: uint8 (seg * seglen, target, target, 3) segments, or the failure.
TRAIN_CLIP_SCHEMA = pa.schema(
    [
        (VIDEO_ID, pa.string()),
        (URI, pa.string()),
        (LABEL, pa.int32()),
        (FRAMES, pa.large_binary()),
        (FRAME_INDICES, pa.list_(pa.int32())),
        (STAGE, pa.string()),
        (ERROR_TYPE, pa.string()),
        (MESSAGE, pa.string()),
        (LOAD_SECONDS, pa.float32()),
    ]
)

# TSN evaluation and prediction: one row per video of the list, with its top classes or failure.
EVAL_RESULT_SCHEMA = pa.schema(
    [
        (VIDEO_ID, pa.string()),
        (URI, pa.string()),
        (LABEL, pa.int32()),
        (CLASS_IDS, pa.list_(pa.int32())),
        (PROBS, pa.list_(pa.float32())),
        (LABEL_PROB, pa.float32()),
        (STAGE, pa.string()),
        (ERROR_TYPE, pa.string()),
        (MESSAGE, pa.string()),
    ]
)

# What a frame-cache task reports per video (its summary's counts).
CACHED_FRAMES = "cached_frames"  # frames a cache task stored for a video
CACHED_BYTES = "cached_bytes"
CACHE_RESULT_SCHEMA = pa.schema(  # a frame cache task's row per video, for the writer stage
    [
        (VIDEO_ID, pa.string()),
        (URI, pa.string()),
        (CACHED_FRAMES, pa.int64()),
        (CACHED_BYTES, pa.int64()),
        (DECODE_SECONDS, pa.float32()),
        (STAGE, pa.string()),
        (ERROR_TYPE, pa.string()),
        (MESSAGE, pa.string()),
    ]
)
