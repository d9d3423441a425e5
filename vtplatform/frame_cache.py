"""The decoded-frame cache (the seed's "训练加速"): decode each video once, train many epochs.

A Ray Data job decodes every video of a list in CPU tasks and stores its frames after
VideoTag's short-side scaling (before any crop), as JPEG or raw uint8, in Parquet shards.
Layout under the cache root (a local folder or an ``s3://`` prefix)::

    cache.json                        the settings every reader checks (encoding, short side, pool)
    frames/shard-<hash>.parquet       schema.FRAME_CACHE_FRAMES_SCHEMA; one video per row-group run
    index/part-<hash>.parquet         schema.FRAME_CACHE_INDEX_SCHEMA; one row per cached video
    dead_letters/part-<hash>.parquet  videos that could not be decoded

Each video's frames are written in row groups of ``frames_per_row_group`` rows that hold no
other video, so pool position p lives in row group ``first_row_group + p // G`` at row
``p % G``: a reader fetches only the row groups of the frames it samples. A task writes its
shard, then its index part; a rerun skips every video already indexed.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.outputs import frame_cache as cache_tables
from vtplatform.outputs.frame_cache import FrameCacheOutput
from vtplatform.pipeline import JobSummary, VideoJob, map_cpu_tasks, prepare_output, run_video_job
from vtplatform.resources import sized, task_sizes
from vtplatform.tsn_data import pool_indices, read_list
from vtplatform.video.reader import BadVideo, ReadOptions, iter_all_frames, read_frames, read_options
from vtplatform.video.transforms import scale

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def cache_settings(config: Config) -> dict[str, Any]:
    """What a reader must agree with; ``short_size`` is TRAIN's (every phase must use the same)."""
    fc = config.frame_cache
    return {
        "cache_version": CACHE_VERSION,
        "encoding": fc.encoding,
        "jpeg_quality": fc.jpeg_quality if fc.encoding == "jpeg" else None,
        "short_size": config.train.short_size,
        "keep_frames": fc.keep_frames,
        "frames_per_row_group": fc.frames_per_row_group,
        "resize": "pillow-bilinear, exactly 4:3 of the short side unless it already equals short_size",
    }


def read_settings(root_uri: str, storage: StorageSection) -> dict[str, Any] | None:
    return cache_tables.read_settings(*st.filesystem(root_uri, storage))


def open_cache(root_uri: str, storage: StorageSection) -> tuple[dict[str, Any], pa.Table]:
    """(settings, index) of an existing cache; ``ConfigError`` if ``root_uri`` holds none."""
    settings = read_settings(root_uri, storage)
    if settings is None:
        raise ConfigError(
            f"no frame cache at {st.redact(root_uri)} (no {S.CACHE_SETTINGS_FILE}); build one with jobs/cache_frames.py"
        )
    fs, root = st.filesystem(root_uri, storage)
    return settings, cache_tables.read_index(fs, root)


# -- writing ---------------------------------------------------------------------------------


def _encode(rgb: np.ndarray, encoding: str, quality: int | None) -> bytes:
    if encoding == "uint8":
        return np.ascontiguousarray(rgb).tobytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _ShardWriter:
    """One Parquet shard, written to a local file; each ``add_group`` becomes one row group."""

    def __init__(self, path: str, encoding: str):
        self.path = path
        compression = {
            S.VIDEO_ID: "zstd",
            S.POSITION: "zstd",
            S.FRAME_INDEX: "zstd",
            S.DATA: "zstd" if encoding == "uint8" else "none",
        }
        self.writer = pq.ParquetWriter(path, S.FRAME_CACHE_FRAMES_SCHEMA, compression=compression)
        self.row_groups = 0
        self.bytes = 0

    def add_group(self, video_id: str, positions: list[int], indices: list[int], data: list[bytes]) -> None:
        table = pa.table(
            {S.VIDEO_ID: [video_id] * len(data), S.POSITION: positions, S.FRAME_INDEX: indices, S.DATA: data},
            schema=S.FRAME_CACHE_FRAMES_SCHEMA,
        )
        self.writer.write_table(table, row_group_size=len(data))
        self.row_groups += 1
        self.bytes += sum(len(d) for d in data)

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True)
class CacheTask:
    """What a cache task needs, decided by the driver."""

    root: str  # the cache root URI
    settings: dict[str, Any]
    read: ReadOptions
    storage: StorageSection


def _cache_one(row: dict, task: CacheTask, shard: _ShardWriter) -> dict:
    """Appends one video's frames to ``shard``; returns its index row. Raises ``BadVideo``."""
    settings = task.settings
    group_size, short = settings["frames_per_row_group"], settings["short_size"]
    first_group = shard.row_groups
    pending: list[tuple[int, int, bytes]] = []
    shape: tuple[int, ...] = ()

    def flush() -> None:
        if pending:
            shard.add_group(
                row[S.VIDEO_ID], [p for p, _, _ in pending], [i for _, i, _ in pending], [d for _, _, d in pending]
            )
            pending.clear()

    def add(position: int, index: int, rgb: np.ndarray) -> None:
        nonlocal shape
        if shape and rgb.shape != shape:
            raise BadVideo(
                "decode", "InconsistentFrameSize", f"frame {index} is {rgb.shape[:2]}, earlier ones {shape[:2]}"
            )
        shape = rgb.shape
        pending.append((position, index, _encode(rgb, settings["encoding"], settings["jpeg_quality"])))
        if len(pending) == group_size:
            flush()

    with st.local_copy(row[S.URI], task.storage) as path:
        if settings["keep_frames"] is None:
            info, frames = iter_all_frames(path, lambda f: scale(f, short), task.read)
            count = 0
            for count, rgb in enumerate(frames, start=1):
                add(count - 1, count - 1, rgb)
            num_frames, pool_size, fps, decoder = count, count, info.fps, info.decoder
            if count == 0:
                raise BadVideo("decode", "NoFrames", "no frame of the video stream could be decoded")
            if info.num_frames >= 0 and info.num_frames != count:
                raise BadVideo(
                    "decode", "UnstableDecode", f"the decoder reported {info.num_frames} frames but yielded {count}"
                )
        else:
            clip = read_frames(
                path, lambda n: pool_indices(n, settings["keep_frames"]), lambda f: scale(f, short), task.read
            )
            for position, (index, rgb) in enumerate(zip(clip.indices.tolist(), clip.frames, strict=True)):
                add(position, index, rgb)
            num_frames, pool_size, fps, decoder = clip.num_frames, len(clip.indices), clip.fps, clip.decoder
    flush()
    return {
        S.VIDEO_ID: row[S.VIDEO_ID],
        S.URI: row[S.URI],
        S.LABEL: row[S.LABEL],
        S.NUM_FRAMES: num_frames,
        S.POOL_SIZE: pool_size,
        S.HEIGHT: shape[0],
        S.WIDTH: shape[1],
        S.FPS: fps,
        S.DECODER: decoder,
        S.FIRST_ROW_GROUP: first_group,
    }


def write_shard(batch: pa.Table, task: CacheTask) -> pa.Table:
    """A Ray Data task: decodes the batch's videos into one shard, then indexes them.

    Returns one ``schema.CACHE_RESULT_SCHEMA`` row per video for the writer stage, which turns
    the failed ones into dead letters. A video that fails halfway leaves unindexed row groups
    behind, never a bad entry.
    """
    rows = batch.to_pylist()
    ids = [r[S.VIDEO_ID] for r in rows]
    shard_rel = f"{S.FRAMES_DIR}/{st.part_name(ids, 'shard')}"
    fs, root = st.filesystem(task.root, task.storage)
    indexed, results = [], []
    with tempfile.TemporaryDirectory(prefix="vtp-cache-") as tmp:
        shard = _ShardWriter(os.path.join(tmp, "shard.parquet"), task.settings["encoding"])
        try:
            for row in rows:
                start, before = time.perf_counter(), shard.bytes
                result = {S.VIDEO_ID: row[S.VIDEO_ID], S.URI: row[S.URI], S.CACHED_FRAMES: 0, S.CACHED_BYTES: 0}
                try:
                    entry = _cache_one(row, task, shard)
                except BadVideo as bad:
                    result |= S.failure(bad.stage, bad.error_type, st.redact(bad.message))
                except OSError as exc:
                    result |= S.failure("read", type(exc).__name__, st.redact(str(exc)))
                else:
                    indexed.append(entry | {S.SHARD: shard_rel})
                    result |= {S.CACHED_FRAMES: entry[S.POOL_SIZE], S.CACHED_BYTES: shard.bytes - before}
                results.append(result | {S.DECODE_SECONDS: time.perf_counter() - start})
        finally:
            shard.close()
        if indexed:
            _upload(shard.path, fs, f"{root}/{shard_rel}")
            st.write_parquet(
                pa.Table.from_pylist(indexed, schema=S.FRAME_CACHE_INDEX_SCHEMA),
                fs,
                f"{root}/{S.INDEX_DIR}/{st.part_name(ids)}",
            )
    return pa.Table.from_pylist(results, schema=S.CACHE_RESULT_SCHEMA)


def _upload(local: str, fs: pafs.FileSystem, path: str) -> None:
    """Moves a finished local file into place atomically (rename locally; one upload on S3)."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.tmp-{os.path.basename(path)}-{os.getpid()}"
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)
        return
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def run_cache(config: Config, filelist: str, save_dir: str, retry_failed: bool = False) -> JobSummary:
    """Caches every listed video not yet in ``save_dir``. Needs ``ray.init()``."""
    start = time.perf_counter()
    if config.model.format == "frames":
        raise ConfigError(
            "MODEL.format is frames: those lists are decoded frames already; the cache is built from videos"
        )
    config = prepare_output(config, save_dir)
    settings = cache_settings(config)
    res, per_file = config.resources, config.frame_cache.videos_per_file
    sizes = sized(config, lambda c: task_sizes(config, c), [{"CPU": res.decode_cpus}])
    task = CacheTask(save_dir, settings, read_options(config), config.storage)
    job = VideoJob(
        "frame cache",
        "cpu",
        entries=read_list(filelist, config, labelled=False),
        stages=[
            lambda ds: map_cpu_tasks(
                ds,
                write_shard,
                batch_size=per_file,
                num_cpus=sizes.task_cpus,
                concurrency=sizes.task_concurrency,
                max_retries=res.decode_max_retries,
                fn_kwargs={"task": task},
            )
        ],
        outputs=[FrameCacheOutput(settings, save_dir)],
        writer_cpus=sizes.writer_cpus,
        blocks=lambda todo: _blocks(todo.select([S.VIDEO_ID, S.URI, S.LABEL]), per_file),
    )
    return run_video_job(config, save_dir, job, retry_failed, start)


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]
