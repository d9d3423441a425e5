"""TSN data: labelled lists, per-epoch sample plans, and the stage that loads sampled segments.

Sources, all giving the same rows:

* the seed's TSN lists, ``path label`` (exactly one integer label; local paths or ``s3://``),
  or any manifest form ``manifest.read_manifest`` accepts with one label per video;
* the seed's frames layout (``MODEL.format: frames``): lists of ``dir num_frames label`` whose
  folders hold ``img_00001.jpg`` ... (``dir`` may contain spaces: the trailing integers are
  ``num_frames`` and the label);
* the decoded-frame cache (``frame_cache``), looked up by ``video_id``; videos it lacks are decoded.

The random choices of a training sample (segment offsets, crop, flip) come from a generator
seeded by (seed, epoch, video_id) alone, so a sample is the same whichever task loads it, from a
video or from the cache, before or after a restart.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from vtplatform import schema as S
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.manifest import parse_list_line, read_manifest, rejected_entry
from vtplatform.pipeline import map_cpu_tasks
from vtplatform.storage import canonical_uri, derive_video_id, filesystem, local_copy, redact
from vtplatform.video.reader import BadVideo, ReadOptions, read_frames, read_options
from vtplatform.video.sampling import infer_indices, segment_indices
from vtplatform.video.transforms import centre_crop, scale, scale_and_crop, train_augment

log = logging.getLogger(__name__)

IMAGE_TEMPLATE = "img_{:05d}.jpg"  # the seed's frames layout, 1-based

MODES = ("train", "valid", "test", "infer")


@dataclass
class LabelledList:
    entries: pa.Table  # S.SAMPLE_SCHEMA without the epoch (epoch 0), unique video_id
    rejected: list[dict] = field(default_factory=list)  # dead-letter rows, stage "manifest"
    duplicates: int = 0

    def __len__(self) -> int:
        return self.entries.num_rows


def read_list(source: str, config: Config, labelled: bool = True) -> LabelledList:
    """Reads a TSN list (``MODEL.format`` video or frames). With ``labelled`` every entry needs
    exactly one integer label below ``MODEL.num_classes``; entries without one are rejected."""
    if config.model.format == "frames":
        rows, rejected, duplicates = _frames_list(source, config.storage)
    else:
        manifest = read_manifest(source, config.storage)
        rows = [
            {S.VIDEO_ID: r[S.VIDEO_ID], S.URI: r[S.URI], "labels": r[S.LABELS], S.NUM_FRAMES: -1}
            for r in manifest.entries.to_pylist()
        ]
        rejected, duplicates = list(manifest.rejected), manifest.duplicates
    kept = []
    for row in rows:
        labels = row.pop("labels")
        problem = _label_problem(labels, config.model.num_classes) if labelled else None
        if problem:
            rejected.append(rejected_entry(row[S.URI], "BadLabel", problem, row[S.VIDEO_ID]))
            continue
        kept.append(row | {S.LABEL: labels[0] if len(labels) == 1 else -1})
    for r in rejected:
        log.warning("list entry rejected: %s", r[S.MESSAGE])
    entries = pa.Table.from_pylist([_sample_row(r) for r in kept], schema=S.SAMPLE_SCHEMA)
    if not len(entries):
        raise ConfigError(
            f"{redact(source)} lists no usable {'labelled ' if labelled else ''}videos ({len(rejected)} rejected)"
        )
    return LabelledList(entries, rejected, duplicates)


def _label_problem(labels: list[int], num_classes: int) -> str | None:
    if len(labels) != 1:
        return f"a TSN list entry needs exactly one integer label, got {len(labels)} ({labels})"
    if labels[0] >= num_classes:
        return f"label {labels[0]} is out of range for MODEL.num_classes={num_classes}"
    return None


def _sample_row(row: dict) -> dict:
    return {
        S.VIDEO_ID: row[S.VIDEO_ID],
        S.URI: row[S.URI],
        S.LABEL: row[S.LABEL],
        S.NUM_FRAMES: row[S.NUM_FRAMES],
        S.EPOCH: 0,
        S.SHARD: None,
        S.FIRST_ROW_GROUP: -1,
        S.POOL_SIZE: -1,
        S.HEIGHT: -1,
        S.WIDTH: -1,
    }


def _frames_list(source: str, storage: StorageSection) -> tuple[list[dict], list[dict], int]:
    """The seed's frames lists: ``DIR NUM_FRAMES [LABEL]`` per line. Split as
    ``manifest.parse_list_line`` splits: the trailing integer tokens are NUM_FRAMES then the
    labels, and DIR is the rest of the line, spaces included."""
    fs, path = filesystem(source, storage)
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8", errors="replace")
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"cannot read frames list {redact(source)}: {exc}") from exc
    rows, rejected, seen, duplicates = [], [], set(), 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            directory, num_frames, labels = _frames_line(line)
        except ValueError as exc:
            rejected.append(rejected_entry(line.strip(), "ManifestParseError", f"line {number}: {exc}"))
            continue
        uri = canonical_uri(directory)
        video_id = derive_video_id(uri)
        if video_id in seen:
            duplicates += 1
            continue
        seen.add(video_id)
        rows.append({S.VIDEO_ID: video_id, S.URI: uri, "labels": labels, S.NUM_FRAMES: num_frames})
    return rows, rejected, duplicates


def _frames_line(line: str) -> tuple[str, int, list[int]]:
    """``DIR NUM_FRAMES [LABEL ...]`` -> (DIR, NUM_FRAMES, labels); ValueError with the reason."""
    expected = f"expected 'DIR NUM_FRAMES LABEL', got {line.strip()!r}"
    try:
        directory, numbers = parse_list_line(line)
    except ValueError as exc:
        raise ValueError(f"{exc}; {expected}") from None
    if not numbers or numbers[0] < 1:
        raise ValueError(expected)
    return directory, numbers[0], numbers[1:]


# -- plans -----------------------------------------------------------------------------------


def steps_per_epoch(num_videos: int, world_size: int, batch_size: int) -> int:
    """Full per-worker batches per epoch; the seed also dropped the last, incomplete batch."""
    return (num_videos // world_size) // batch_size


def train_samples(
    entries: pa.Table, epochs: range, seed: int, rank: int, world_size: int, batch_size: int, skip_steps: int = 0
) -> pa.Table:
    """This worker's samples for ``epochs``, in order: each epoch shuffles every video with a
    generator seeded by (seed, epoch), deals them to the workers round-robin and keeps
    ``steps_per_epoch`` full batches per worker. ``skip_steps`` drops that many leading batches
    of the first epoch (resuming from a checkpoint taken mid-epoch)."""
    steps = steps_per_epoch(entries.num_rows, world_size, batch_size)
    if steps < 1:
        raise ConfigError(
            f"{entries.num_rows} training videos cannot fill one batch of {batch_size} per worker "
            f"on {world_size} workers: lower TRAIN.batch_size or add videos"
        )
    parts = []
    for epoch in epochs:
        order = np.random.default_rng([seed, epoch]).permutation(entries.num_rows)
        mine = order[rank::world_size][: steps * batch_size]
        if epoch == epochs.start:
            mine = mine[skip_steps * batch_size :]
        part = entries.take(pa.array(mine, pa.int64()))
        parts.append(
            part.set_column(
                part.schema.get_field_index(S.EPOCH), S.EPOCH, pa.array(np.full(len(mine), epoch, np.int32))
            )
        )
    return pa.concat_tables(parts) if parts else entries.slice(0, 0)


def eval_samples(entries: pa.Table, rank: int = 0, world_size: int = 1) -> pa.Table:
    """Every video once, in list order, dealt round-robin to the workers."""
    return entries.take(pa.array(np.arange(rank, entries.num_rows, world_size), pa.int64()))


def attach_cache(entries: pa.Table, cache_index: pa.Table | None) -> tuple[pa.Table, int]:
    """Points each entry at its frames in the cache (``FRAME_CACHE_INDEX_SCHEMA`` rows); returns
    the entries and how many were found there."""
    if cache_index is None or not entries.num_rows:
        return entries, 0
    found = {r[S.VIDEO_ID]: r for r in cache_index.to_pylist()}
    rows = []
    for row in entries.to_pylist():
        hit = found.get(row[S.VIDEO_ID])
        if hit is not None:
            row |= {k: hit[k] for k in (S.SHARD, S.FIRST_ROW_GROUP, S.POOL_SIZE, S.HEIGHT, S.WIDTH, S.NUM_FRAMES)}
        rows.append(row)
    hits = sum(1 for r in rows if r[S.SHARD] is not None)
    return pa.Table.from_pylist(rows, schema=S.SAMPLE_SCHEMA), hits


# -- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSpec:
    """How one phase samples and transforms a video; decided once by the driver."""

    mode: str  # train | valid | test | infer
    seg_num: int
    seglen: int
    short_size: int
    target_size: int
    seed: int
    keep_frames: int | None  # the pool each video's segments are drawn from (None: every frame)
    source_format: str  # MODEL.format: video | frames
    read: ReadOptions
    storage: StorageSection
    cache_root: str | None = None
    cache_encoding: str = "jpeg"
    frames_per_row_group: int = 16

    @property
    def training(self) -> bool:
        return self.mode == "train"


def clip_spec(config: Config, mode: str, seed: int, cache: dict[str, Any] | None = None) -> ClipSpec:
    """``cache`` is the frame cache's settings (``frame_cache.read_settings``) when one is used."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    phase = getattr(config, mode)
    keep = config.frame_cache.keep_frames
    if cache is not None:
        if cache["short_size"] != phase.short_size:
            raise ConfigError(
                f"the frame cache holds frames scaled to short side {cache['short_size']}, "
                f"but {mode.upper()}.short_size is {phase.short_size}"
            )
        if cache["keep_frames"] != keep:
            raise ConfigError(
                f"the frame cache keeps {cache['keep_frames'] or 'every'} frames per video; "
                f"set frame_cache.keep_frames={cache['keep_frames']}"
            )
    return ClipSpec(
        mode=mode,
        seg_num=phase.seg_num,
        seglen=config.model.seglen,
        short_size=phase.short_size,
        target_size=phase.target_size,
        seed=seed,
        keep_frames=keep,
        source_format=config.model.format,
        read=read_options(config),
        storage=config.storage,
        cache_root=config.frame_cache.path if cache is not None else None,
        cache_encoding=cache["encoding"] if cache is not None else "jpeg",
        frames_per_row_group=cache["frames_per_row_group"] if cache is not None else 16,
    )


def sample_rng(seed: int, epoch: int, video_id: str) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha1(video_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, epoch, key])


def pool_indices(num_frames: int, keep_frames: int | None) -> np.ndarray:
    """The frames a video's segments are drawn from: all of them, or VideoTag's centred rule
    with ``keep_frames`` segments (the fixed subset a frame cache keeps)."""
    return np.arange(num_frames, dtype=np.int64) if keep_frames is None else infer_indices(num_frames, keep_frames)


def positions(pool_size: int, spec: ClipSpec, rng: np.random.Generator | None) -> np.ndarray:
    return segment_indices(pool_size, spec.seg_num, spec.seglen, rng)


def load_stage(ds, spec: ClipSpec, num_cpus: float, concurrency: int | None, max_retries: int):
    """Adds the loading tasks (``load_clips``, a block of sample rows per task) to a dataset."""
    return map_cpu_tasks(
        ds,
        load_clips,
        batch_size=None,
        num_cpus=num_cpus,
        concurrency=concurrency,
        max_retries=max_retries,
        fn_kwargs={"spec": spec},
    )


def load_clips(batch: pa.Table, spec: ClipSpec) -> pa.Table:
    """``S.SAMPLE_SCHEMA`` rows -> ``S.TRAIN_CLIP_SCHEMA`` rows (a Ray Data CPU stage)."""
    shards: dict[str, Any] = {}  # cache shards opened by this call
    try:
        rows = [_load_one(row, spec, shards) for row in batch.to_pylist()]
    finally:
        for shard in shards.values():
            shard.close()
    return pa.Table.from_pylist(rows, schema=S.TRAIN_CLIP_SCHEMA)


def _load_one(row: dict, spec: ClipSpec, shards: dict[str, Any]) -> dict:
    start = time.perf_counter()
    out = {S.VIDEO_ID: row[S.VIDEO_ID], S.URI: row[S.URI], S.LABEL: row[S.LABEL]}
    rng = sample_rng(spec.seed, row[S.EPOCH], row[S.VIDEO_ID]) if spec.training else None
    try:
        if row[S.SHARD] is not None:
            frames, indices = _from_cache(row, spec, rng, shards)
        elif spec.source_format == "frames":
            frames, indices = _from_images(row, spec, rng)
        else:
            frames, indices = _from_video(row, spec, rng)
        if rng is not None:
            frames = train_augment(frames, spec.target_size, rng)
        elif frames.shape[1:3] != (spec.target_size, spec.target_size):
            frames = centre_crop(frames, spec.target_size)
    except BadVideo as bad:
        return out | _failure(bad.stage, bad.error_type, bad.message, start)
    except OSError as exc:  # storage refused the read, a missing image, an unreadable JPEG
        return out | _failure("read", type(exc).__name__, str(exc), start)
    except pa.ArrowException as exc:  # a damaged cache shard
        return out | _failure("read", "CacheError", str(exc), start)
    return out | {
        S.FRAMES: np.ascontiguousarray(frames).tobytes(),
        S.FRAME_INDICES: np.asarray(indices, np.int32).tolist(),
        S.LOAD_SECONDS: time.perf_counter() - start,
    }


def _failure(stage: str, error_type: str, message: str, start: float) -> dict:
    return S.failure(stage, error_type, redact(message)) | {S.LOAD_SECONDS: time.perf_counter() - start}


def _per_frame(spec: ClipSpec, training: bool):
    """Training keeps the whole scaled frame (the random crop comes after); evaluation crops the
    centre of each frame as soon as it is decoded, to hold less."""
    if training:
        return lambda rgb: scale(rgb, spec.short_size)
    return lambda rgb: scale_and_crop(rgb, spec.short_size, spec.target_size)


def _from_video(row: dict, spec: ClipSpec, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    def choose(num_frames: int) -> np.ndarray:
        pool = pool_indices(num_frames, spec.keep_frames)
        return pool[positions(len(pool), spec, rng)]

    with local_copy(row[S.URI], spec.storage) as path:
        clip = read_frames(path, choose, _per_frame(spec, rng is not None), spec.read)
    return clip.frames, clip.indices


def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _from_images(row: dict, spec: ClipSpec, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """The seed's frames layout: ``DIR/img_{i+1:05d}.jpg`` for frame i."""
    pool = pool_indices(row[S.NUM_FRAMES], spec.keep_frames)
    indices = pool[positions(len(pool), spec, rng)]
    fs, root = filesystem(row[S.URI], spec.storage)
    per_frame = _per_frame(spec, rng is not None)
    decoded = {}
    for i in np.unique(indices).tolist():
        path = f"{root}/{IMAGE_TEMPLATE.format(i + 1)}"
        with fs.open_input_stream(path) as f:
            data = f.read()
        try:
            decoded[i] = per_frame(_decode_image(data))
        except OSError as exc:
            raise BadVideo("decode", "ImageDecodeError", f"{IMAGE_TEMPLATE.format(i + 1)}: {exc}") from exc
    shapes = {a.shape for a in decoded.values()}
    if len(shapes) != 1:
        raise BadVideo("decode", "InconsistentFrameSize", f"frames of different sizes after scaling: {sorted(shapes)}")
    return np.stack([decoded[i] for i in indices.tolist()]), indices


def _from_cache(
    row: dict, spec: ClipSpec, rng: np.random.Generator | None, shards: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    pos = positions(row[S.POOL_SIZE], spec, rng)
    shard = shards.get(row[S.SHARD])
    if shard is None:
        fs, root = filesystem(spec.cache_root, spec.storage)
        shard = shards[row[S.SHARD]] = pq.ParquetFile(fs.open_input_file(f"{root}/{row[S.SHARD]}"))
    group_size = spec.frames_per_row_group
    wanted = sorted({int(p) // group_size for p in pos})
    groups = {
        g: shard.read_row_group(row[S.FIRST_ROW_GROUP] + g, columns=[S.POSITION, S.FRAME_INDEX, S.DATA]) for g in wanted
    }
    frames, indices = {}, []
    for p in pos.tolist():
        group = groups[p // group_size]
        r = p % group_size
        if group.column(S.POSITION)[r].as_py() != p:
            raise pa.ArrowInvalid(f"cache shard {row[S.SHARD]}: row {r} of group {p // group_size} is not position {p}")
        indices.append(group.column(S.FRAME_INDEX)[r].as_py())
        if p not in frames:
            frames[p] = _cached_frame(group.column(S.DATA)[r].as_py(), row, spec)
    per_frame = (lambda f: f) if rng is not None else (lambda f: centre_crop(f[None], spec.target_size)[0])
    return np.stack([per_frame(frames[p]) for p in pos.tolist()]), np.asarray(indices, np.int64)


def _cached_frame(data: bytes, row: dict, spec: ClipSpec) -> np.ndarray:
    if spec.cache_encoding == "uint8":
        return np.frombuffer(data, np.uint8).reshape(row[S.HEIGHT], row[S.WIDTH], 3)
    try:
        return _decode_image(data)
    except OSError as exc:
        raise BadVideo("decode", "ImageDecodeError", f"cached frame: {exc}") from exc


def clip_frames(table: pa.Table, segments: int, target_size: int) -> np.ndarray:
    """The ``frames`` column of loaded rows -> (B, segments, target, target, 3) uint8."""
    shape = (segments, target_size, target_size, 3)
    return np.stack([np.frombuffer(b, np.uint8).reshape(shape) for b in table.column(S.FRAMES).to_pylist()])
