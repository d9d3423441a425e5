"""Configuration: YAML -> typed, frozen dataclasses, validated on load.

The seed's four YAML files load as they are (upper-case MODEL / TRAIN / VALID / TEST / INFER
sections); our configs add lower-case sections for storage, resources, output and the jobs.
Section names are case-insensitive. Command-line overrides look like ``-o INFER.seg_num=8``.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vtplatform.schema import MODEL_NAMES

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and what is allowed."""


def _choice(section: str, key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{key} must be one of {list(allowed)}, got {value!r}")


def _positive(section: str, obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key} must be > 0, got {value!r}")


@dataclass(frozen=True)
class ModelSection:
    """MODEL: the keys of the seed's TSN and AttentionLSTM configs (each model reads its own)."""

    name: str = "TSN"
    format: str = "video"
    num_classes: int = 400
    seglen: int = 1
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    num_layers: int = 101
    topk: int = 5
    dataset: str | None = None
    bone_nework: str | None = None  # sic, the seed's spelling; unused
    drop_rate: float = 0.5
    feature_names: tuple[str, ...] = ("rgb",)
    feature_dims: tuple[int, ...] = (2048,)
    embedding_size: int = 1024
    lstm_size: int = 512
    fc1_size: int = 8192
    fc2_size: int = 4096

    def __post_init__(self) -> None:
        _choice("MODEL", "name", self.name, (*MODEL_NAMES, "VideoTag"))  # VideoTag: TSN then AttentionLSTM
        _choice("MODEL", "format", self.format, ("video", "frames"))
        _choice("MODEL", "num_layers", self.num_layers, (18, 34, 50, 101, 152))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("MODEL.image_mean and MODEL.image_std need 3 values (RGB)")
        _positive("MODEL", self, "num_classes", "seglen", "topk", "embedding_size", "lstm_size", "fc1_size", "fc2_size")


@dataclass(frozen=True)
class PhaseSection:
    """TRAIN / VALID / TEST / INFER: the union of the seed's TSN and AttentionLSTM phase keys."""

    seg_num: int = 300
    short_size: int = 256
    target_size: int = 224
    batch_size: int = 1
    filelist: str | None = None
    epoch: int = 1
    learning_rate: float = 0.001
    use_gpu: bool = True
    num_gpus: int = 1
    num_reader_threads: int = 1
    buf_size: int = 1024
    learning_rate_decay: float = 0.1
    l2_weight_decay: float = 1e-4
    momentum: float = 0.9
    total_videos: int | None = None
    decay_epochs: tuple[int, ...] = ()
    decay_gamma: float = 0.1
    weight_decay: float = 8e-4
    num_samples: int | None = None
    pretrain_base: str | None = None

    def __post_init__(self) -> None:
        _positive("PHASE", self, "seg_num", "short_size", "target_size", "batch_size", "epoch")
        if self.target_size > self.short_size:
            raise ConfigError(f"target_size ({self.target_size}) cannot exceed short_size ({self.short_size})")


@dataclass(frozen=True)
class StorageSection:
    """S3 access. Credentials are never configured here: they come from the standard AWS
    environment (variables, profile, instance role)."""

    endpoint_url: str | None = None  # S3-compatible stores; AWS_ENDPOINT_URL is used when unset
    region: str | None = None
    # One retry policy for every S3 request (data, Parquet parts, videos, listings, Ray Train
    # checkpoints): throttling (503 SlowDown), 5xx, resets and timeouts are retried; a request
    # that keeps failing fails after retry_attempts tries or retry_deadline_s, whichever comes first.
    retry_attempts: int = 12  # tries per request, the first included
    retry_base_s: float = 0.1  # backoff before retry n: a random wait in [0, min(retry_max_s, retry_base_s * 2**n)]
    retry_max_s: float = 10.0
    retry_deadline_s: float = 120.0  # a request and its retries give up after this long
    connect_timeout_s: float = 10.0  # per attempt
    read_timeout_s: float = 60.0  # per attempt: no byte for this long and the attempt fails (and is retried)

    def __post_init__(self) -> None:
        _positive("storage", self, "retry_attempts", "retry_deadline_s", "connect_timeout_s", "read_timeout_s")
        for key in ("retry_base_s", "retry_max_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"storage.{key} must be >= 0, got {getattr(self, key)!r}")
        if self.retry_max_s < self.retry_base_s:
            raise ConfigError(
                f"storage.retry_max_s ({self.retry_max_s}) must be >= storage.retry_base_s ({self.retry_base_s})"
            )


@dataclass(frozen=True)
class ResourcesSection:
    """Stage sizes and batch sizes of the Ray Data pipelines."""

    use_gpu: str = "auto"  # auto | true | false
    decode_cpus: float = 1.0  # CPUs per decode task
    decode_concurrency: int | None = None  # max decode tasks at once (None: as many as CPUs allow)
    decode_batch_size: int = 16  # videos per decode task, at most (samples per load task in TSN training)
    decode_task_mb: int = 512  # ... and at most this much video per task where sizes are known: long ones go alone
    decode_max_retries: int = 3  # retries of a decode task whose worker died (Ray Data's default is forever),
    # beyond those extraction and tagging charge to a video: one that killed its worker twice is dead-lettered
    tsn_actors: int = 1  # TSN actors (1 GPU each when GPUs are used)
    tsn_cpus: float = 1.0  # CPUs Ray reserves per TSN actor
    tsn_threads: int | None = None  # Paddle math threads per TSN actor on CPU (None: max(1, tsn_cpus))
    tsn_gpus: float = 1.0  # GPUs per TSN actor when GPUs are used
    tsn_frames_per_forward: int = 32  # frames per forward pass
    lstm_actors: int = 1  # AttentionLSTM actors when tagging
    lstm_cpus: float = 1.0  # CPUs Ray reserves per AttentionLSTM tagging actor
    lstm_gpus: float = 0.0  # GPUs per AttentionLSTM tagging actor when GPUs are used (a fraction is plenty)
    lstm_threads: int | None = None  # Paddle threads per AttentionLSTM actor on CPU (None: max(1, lstm_cpus))
    train_workers: int | None = None  # Ray Train workers (None: TRAIN.num_gpus); TRAIN.batch_size is split across them;
    # also the AttentionLSTM actors of evaluation and prediction
    train_cpus: float | None = None  # CPUs per training worker (None: 1, scaled down on a cluster with fewer CPUs)
    train_threads: int | None = None  # Paddle CPU math threads per training worker (None: max(1, train_cpus))
    writer_concurrency: int | None = None
    wait_for_resources_s: float = 0.0  # a cluster short of CPUs/GPUs: ask its autoscaler and wait this long (0: fail)

    def __post_init__(self) -> None:
        _choice("resources", "use_gpu", str(self.use_gpu).lower(), ("auto", "true", "false"))
        if self.wait_for_resources_s < 0:
            raise ConfigError(f"resources.wait_for_resources_s must be >= 0, got {self.wait_for_resources_s}")
        _positive("resources", self, "decode_cpus", "decode_batch_size", "decode_task_mb", "tsn_actors", "tsn_cpus")
        _positive(
            "resources", self, "tsn_frames_per_forward", "decode_concurrency", "writer_concurrency", "tsn_threads"
        )
        _positive("resources", self, "lstm_actors", "lstm_cpus", "lstm_threads")
        _positive("resources", self, "train_workers", "train_cpus", "train_threads")
        if self.lstm_gpus < 0:
            raise ConfigError(f"resources.lstm_gpus must be >= 0, got {self.lstm_gpus}")


@dataclass(frozen=True)
class ExtractSection:
    decoder: str = "auto"  # auto (PyAV's one pass; decord's seeking for sparse reads) | decord | pyav
    decode_threads: int = 1
    chunk_frames: int = 8  # full-size frames held at once while decoding
    decord_max_frames: int = 1200  # decoder auto: decord may seek in files it reads exactly up to this long (0: never)
    decode_timeout_s: float | None = 1800.0  # reading + decoding one video; past it the worker is killed
    precision: str = "auto"  # auto (float16 on GPU, float32 on CPU) | float32 | float16
    seed: int = 0  # random-init seed when no weights are given

    def __post_init__(self) -> None:
        _choice("extract", "decoder", self.decoder, ("auto", "decord", "pyav"))
        _choice("extract", "precision", self.precision, ("auto", "float32", "float16"))
        _positive("extract", self, "decode_threads", "chunk_frames")
        if self.decord_max_frames < 0:
            raise ConfigError(f"extract.decord_max_frames must be >= 0, got {self.decord_max_frames!r}")
        if self.decode_timeout_s is not None and not self.decode_timeout_s > 0:
            raise ConfigError(f"extract.decode_timeout_s must be > 0 or null, got {self.decode_timeout_s!r}")


@dataclass(frozen=True)
class OutputSection:
    dtype: str = "float16"  # feature dtype in the table
    format: str = "parquet"  # parquet | npy (the table plus the seed's per-video .npy files)
    rows_per_file: int = 64  # rows per file, and the bound on finished videos not yet on storage

    def __post_init__(self) -> None:
        _choice("output", "dtype", self.dtype, ("float16", "float32"))
        _choice("output", "format", self.format, ("parquet", "npy"))
        _positive("output", self, "rows_per_file")


@dataclass(frozen=True)
class FrameCacheSection:
    """The decoded-frame cache: ``jobs/cache_frames.py`` writes it; TSN training, evaluation and
    prediction read frames from it when ``path`` is set (videos missing from it are decoded)."""

    path: str | None = None  # a cache folder or s3:// prefix to read frames from
    encoding: str = "jpeg"  # jpeg | uint8 (exact, about 10x larger)
    jpeg_quality: int = 90
    keep_frames: int | None = None  # null: every frame; K: a fixed, evenly spaced pool of K frames per video
    frames_per_row_group: int = 16  # the unit a reader fetches: smaller reads less per sampled frame
    videos_per_file: int = 8  # videos per Parquet shard (one decode task writes one shard)

    def __post_init__(self) -> None:
        _choice("frame_cache", "encoding", self.encoding, ("jpeg", "uint8"))
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"frame_cache.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        _positive("frame_cache", self, "keep_frames", "frames_per_row_group", "videos_per_file")


@dataclass(frozen=True)
class TrainRunSection:
    """train_run: how a fine-tune runs on Ray Train (any model). The model's hyper-parameters stay
    in the seed's TRAIN section; the workers' sizes are ``resources.train_*``."""

    run_name: str | None = None  # default: MODEL.name; rerun with the same name and --save_dir to resume
    amp: str = "none"  # none | float16 | bfloat16: automatic mixed precision, GPU only
    seed: int = 0  # initialisation, data order and dropout: a resumed run replays an uninterrupted one
    checkpoint_every_steps: int = 0  # also checkpoint every K steps (0: at the end of each epoch only)
    keep_checkpoints: int = 3  # the last N checkpoints stay; the best by validation GAP is copied to best/
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    log_interval: int = 10  # steps between progress lines
    valid_interval: int = 1  # epochs between validations (0: never)
    shuffle_buffer: int = 256  # rows in each worker's shuffle buffer (0: no shuffling)

    def __post_init__(self) -> None:
        _choice("train_run", "amp", self.amp, ("none", "float16", "bfloat16"))
        _positive(
            "train_run",
            self,
            "keep_checkpoints",
            "log_interval",
        )
        for key in ("checkpoint_every_steps", "max_failures", "valid_interval", "shuffle_buffer"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train_run.{key} must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class DataSection:
    """data: the AttentionLSTM's inputs. With ``features`` set, each phase's ``filelist`` gives the
    labels (a seed list file or a labels table keyed by video_id or uri) joined to that feature
    table; without it, ``filelist`` is the seed's list of .npy feature files."""

    features: str | None = None  # feature table written by jobs/extract.py: OUT/features (local or s3://)
    on_bad_row: str = "error"  # error | skip: a missing feature file, a label >= num_classes, a wrong shape
    check_provenance: bool = True  # refuse features made differently from those a checkpoint was trained on
    cache_mb: int = 512  # phases up to this size are read once into Ray's object store; larger ones stream each epoch

    def __post_init__(self) -> None:
        _choice("data", "on_bad_row", self.on_bad_row, ("error", "skip"))


@dataclass(frozen=True)
class TagSection:
    """tag: batch tagging (``jobs/tag.py``) and the tagging step of the nightly run."""

    topk: int | None = None  # tags kept per video, best first (None: MODEL.topk)
    threshold: float = 0.5  # probabilities at or above it also go to the ``labels`` column
    label_file: str | None = None  # class names, line i = class i (the seed's label_3396.txt)
    write_features: bool = False  # also write the TSN features table beside the tags
    hub_threshold: float = 0.5  # the PaddleHub-style list keeps tags at or above this ...
    hub_top_k: int = 10  # ... and at most this many per video
    segment_seconds: float | None = None  # also tag windows of this many seconds (jobs/tag.py --segments)
    segment_stride_seconds: float | None = None  # window start to next window start (None: segment_seconds)
    timeline_fps: float = 1.0  # frames per second decoded for the windows, by presentation time
    write_timeline: bool = False  # keep the per-frame features of the windows under timeline/
    thumbnails: bool = False  # write small JPEGs for jobs/report.py (one per video, one per window)
    timeline_chunk_frames: int = 512  # timeline frames per chunk through TSN (whole windows; about 77 MB at 224)

    def __post_init__(self) -> None:
        for key in ("threshold", "hub_threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"tag.{key} must be in [0, 1], got {getattr(self, key)}")
        _positive(
            "tag",
            self,
            "topk",
            "hub_top_k",
            "segment_seconds",
            "segment_stride_seconds",
            "timeline_fps",
            "timeline_chunk_frames",
        )


@dataclass(frozen=True)
class NightlySection:
    """nightly: the daily incremental extract -> fine-tune -> eval gate -> promote -> tag the library run."""

    library: str | None = None  # the video library: a manifest, folder or glob (local or s3://)
    labels: str | None = None  # training labels: a seed list file or a table keyed by video_id or uri
    holdout: str | None = None  # the fixed evaluation set, same formats; never trained on
    registry: str | None = None  # model registry: champion pointer, history, candidates (local or s3://)
    features: str | None = None  # the feature store (default: REGISTRY/features)
    timeline: str | None = None  # the timeline store, with segment_seconds (default: REGISTRY/timeline)
    tags: str | None = None  # the champions' tags: a folder per model and a current pointer (default: REGISTRY/tags)
    tsn_weights: str | None = None  # the TSN extractor's weights (None: random init, for trials only)
    pretrain: str | None = None  # AttentionLSTM weights to start from while there is no champion
    margin: float = 0.001  # promote only if the candidate's holdout GAP beats the champion's by this
    # also keep segment tags (windows of this many seconds; tag.segment_stride_seconds, tag.timeline_fps)
    # of every library video up to date with the champion, beside its tags (off by default)
    segment_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ConfigError(f"nightly.margin must be >= 0, got {self.margin}")
        _positive("nightly", self, "segment_seconds")


PHASE_DEFAULTS = {
    "train": {"seg_num": 3, "batch_size": 32},
    "valid": {"seg_num": 3, "batch_size": 32},
    "test": {"seg_num": 7, "batch_size": 16},
    "infer": {"seg_num": 300, "batch_size": 1},
}


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    train: PhaseSection = field(default_factory=lambda: PhaseSection(**PHASE_DEFAULTS["train"]))
    valid: PhaseSection = field(default_factory=lambda: PhaseSection(**PHASE_DEFAULTS["valid"]))
    test: PhaseSection = field(default_factory=lambda: PhaseSection(**PHASE_DEFAULTS["test"]))
    infer: PhaseSection = field(default_factory=lambda: PhaseSection(**PHASE_DEFAULTS["infer"]))
    storage: StorageSection = field(default_factory=StorageSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    extract: ExtractSection = field(default_factory=ExtractSection)
    output: OutputSection = field(default_factory=OutputSection)
    frame_cache: FrameCacheSection = field(default_factory=FrameCacheSection)
    train_run: TrainRunSection = field(default_factory=TrainRunSection)
    data: DataSection = field(default_factory=DataSection)
    tag: TagSection = field(default_factory=TagSection)
    nightly: NightlySection = field(default_factory=NightlySection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML file (or none, for the defaults) and applies ``SECTION.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    sections = _normalise_sections(raw)
    for item in overrides or []:
        section, key, value = parse_override(item)
        sections.setdefault(section, {})[key] = value
    return build_config(sections)


def parse_override(item: str) -> tuple[str, str, Any]:
    """``"INFER.seg_num=8"`` -> ("infer", "seg_num", 8); the value is parsed as YAML."""
    target, sep, value = item.partition("=")
    section, dot, key = target.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"override {item!r} must look like SECTION.key=value, e.g. INFER.seg_num=8")
    section = section.lower()
    _check_section(section)
    return section, key, yaml.safe_load(value) if value.strip() else None


# Keys that moved: every actor and worker size lives under ``resources``. The old names still
# work, with a warning, so that existing configs and scripts keep running.
MOVED_KEYS = {
    ("tag", "lstm_actors"): ("resources", "lstm_actors"),
    ("tag", "lstm_cpus"): ("resources", "lstm_cpus"),
    ("tag", "lstm_gpus"): ("resources", "lstm_gpus"),
    ("tag", "lstm_threads"): ("resources", "lstm_threads"),
    ("tag", "lstm_batch_size"): ("resources", "lstm_batch_size"),  # then retired
    ("train_run", "num_workers"): ("resources", "train_workers"),
    ("train_run", "cpus_per_worker"): ("resources", "train_cpus"),
    ("train_run", "threads_per_worker"): ("resources", "train_threads"),
}


# Keys that no longer mean anything: they load with a warning saying why.
RETIRED_KEYS = {
    ("resources", "tsn_batch_size"): "a TSN actor now takes one decoded block at a time (about 512 frames, "
    "or one video or timeline chunk when that alone is more), so its memory is bounded by frames, not videos",
    ("resources", "lstm_batch_size"): "the tagging AttentionLSTM takes a video, or a timeline chunk's windows, "
    "at a time",
}


def _move_renamed_keys(sections: dict[str, dict[str, Any]]) -> None:
    for (old_section, old_key), (new_section, new_key) in MOVED_KEYS.items():
        if old_key not in sections.get(old_section, {}):
            continue
        value = sections[old_section].pop(old_key)
        if new_key in sections.get(new_section, {}):
            raise ConfigError(f"{old_section}.{old_key} and {new_section}.{new_key} are both set; keep only the latter")
        log.warning("%s.%s is now %s.%s; please rename it", old_section, old_key, new_section, new_key)
        sections.setdefault(new_section, {})[new_key] = value
    for (section, key), why in RETIRED_KEYS.items():
        if key in sections.get(section, {}):
            sections[section].pop(key)
            log.warning("%s.%s is no longer used (%s); please remove it", section, key, why)


def build_config(sections: dict[str, dict[str, Any]]) -> Config:
    sections = {name: dict(values) if isinstance(values, dict) else values for name, values in sections.items()}
    _move_renamed_keys(sections)
    kwargs = {}
    for name, values in sections.items():
        _check_section(name)
        if not isinstance(values, dict):
            raise ConfigError(f"section {name} must be a mapping, got {type(values).__name__}")
        cls = _section_type(name)
        defaults = PHASE_DEFAULTS.get(name, {})
        kwargs[name] = _build_section(cls, {**defaults, **values}, name)
    return Config(**kwargs)


def _normalise_sections(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {}
    for name, values in raw.items():
        key = str(name).lower()
        _check_section(key)
        if key in sections:
            raise ConfigError(f"section {name} appears twice (section names are case-insensitive)")
        sections[key] = dict(values or {})
    return sections


def _check_section(name: str) -> None:
    allowed = [f.name for f in dataclasses.fields(Config)]
    if name not in allowed:
        raise ConfigError(f"unknown config section {name!r}; allowed: {allowed}")


def _section_type(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def _build_section(cls: type, values: dict[str, Any], section: str):
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in section {section}; allowed: {sorted(hints)}")
    coerced = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    try:
        return cls(**coerced)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("PHASE.", f"{section.upper()}.")) from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Checks and converts a YAML value to the field's type ('1e-4' -> 1e-4, 'None' -> None)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if type(None) in options and (value is None or value == "None"):
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v, item, where) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is str:
        if isinstance(value, bool):
            return str(value).lower()
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    if hint in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if hint is float else _to_int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a{'n integer' if hint is int else ' number'}, got {value!r}") from None
        return number
    raise TypeError(f"unsupported config type {hint} for {where}")


def _to_int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)
