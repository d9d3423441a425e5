"""The decode stage of extraction and tagging: ``(video_id, uri)`` rows -> sampled crops, in
Ray CPU tasks, with the ledger that turns a video that kills its decoder into a dead letter.

Batches are Arrow tables (``schema.ROW_SCHEMA``): a video's row (the columns of
``schema.CLIP_SCHEMA``) and, when tagging with segments, its timeline chunk rows (those of
``schema.CHUNK_SCHEMA``), each with its kind in ``schema.ROW_KIND``. A video that fails
becomes a row with ``stage``/``error_type``/``message`` set, which later stages pass through
untouched and the writer turns into a dead letter.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vtplatform import faults
from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform.config import Config, StorageSection
from vtplatform.pipeline import map_cpu_tasks
from vtplatform.storage import local_copy, redact
from vtplatform.video.reader import (
    BadVideo,
    ReadOptions,
    infer_plan,
    read_frames,
    read_frames_and_timeline,
    read_options,
)
from vtplatform.video.transforms import thumbnail_jpeg
from vtplatform.windows import NoWindow, chunk_windows

log = logging.getLogger(__name__)

CRASHES_BEFORE_DEAD_LETTER = 2


class DecodeLedger:
    """Which videos killed the process decoding them, so that a poison video becomes a dead letter
    instead of failing its task again and again, and the job with it.

    A decoder that segfaults or hangs (the watchdog then kills its worker), or a worker killed
    for memory, takes its Ray task down, and Ray retries the task. A task asks here once, with
    its whole block (``begin``): on its first attempt it decodes with no further calls, so the
    ledger costs one round trip per block, not per video. A retried block is decoded carefully,
    recording each video's start (``start``) before decoding it and its end after (``finish``):
    a video left started when the next attempt begins is the one that killed the process. A hang
    the watchdog catches names its video itself (``timed_out``). At ``CRASHES_BEFORE_DEAD_LETTER``
    deaths a video becomes a dead letter. A block's task may so die ``1 + CRASHES_BEFORE_DEAD_LETTER
    * videos`` times, so its Ray retries are that many plus ``resources.decode_max_retries`` for
    deaths no video is charged with. One per pipeline, created by ``decode_ledger()``.
    """

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}  # block key -> attempts begun
        self.open: set[str] = set()  # videos started by a careful attempt and not finished
        self.deaths: dict[str, int] = {}
        self.timeouts: dict[str, int] = {}

    def begin(self, block: str, video_ids: list[str]) -> tuple[int, dict[str, tuple[int, int]]]:
        """(earlier attempts of this block, {video_id: (deaths, timeouts)} for its videos with deaths)."""
        for vid in self.open & set(video_ids):  # an earlier attempt died while decoding it
            self.open.discard(vid)
            self.deaths[vid] = self.deaths.get(vid, 0) + 1
        attempt = self.attempts.get(block, 0)
        self.attempts[block] = attempt + 1
        counts = {v: (self.deaths[v], self.timeouts.get(v, 0)) for v in video_ids if v in self.deaths}
        return attempt, counts

    def start(self, video_id: str) -> None:
        self.open.add(video_id)

    def finish(self, video_id: str) -> None:
        self.open.discard(video_id)

    def timed_out(self, video_id: str) -> None:
        self.timeouts[video_id] = self.timeouts.get(video_id, 0) + 1
        if video_id not in self.open:  # a first attempt: nothing else records this death
            self.deaths[video_id] = self.deaths.get(video_id, 0) + 1


def decode_ledger():
    """A ``DecodeLedger`` on the driver's node (the head under ``ray job submit``), so that losing a
    worker node (a spot instance) never takes the ledger, and the job, with it."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(DecodeLedger).options(num_cpus=0, scheduling_strategy=here).remote()


@dataclass(frozen=True)
class TimelineOptions:
    """Time-localized tagging: the timeline's frame rate and the windows over it (``segments``)."""

    fps: float
    segment_s: float
    stride_s: float
    chunk_frames: int = 512  # timeline frames per chunk (whole windows, so a long window makes a longer one)


@dataclass(frozen=True)
class DecodeOptions:
    """Extraction's sampling sizes (``video.reader.infer_plan``) and how to read the videos; for
    tagging with segments, the timeline too, and whether to make thumbnails."""

    num_segments: int
    short_size: int
    target_size: int
    read: ReadOptions
    timeline: TimelineOptions | None = None
    thumbnails: bool = False


def decode_options(config: Config, tagging: bool = False) -> DecodeOptions:
    """The decode options of extraction, or with ``tagging`` of the tag job (``tag.segment_seconds``,
    ``tag.timeline_fps``, ``tag.timeline_chunk_frames``, ``tag.thumbnails``)."""
    tag = config.tag
    timeline = None
    if tagging and tag.segment_seconds:
        stride = tag.segment_stride_seconds or tag.segment_seconds
        timeline = TimelineOptions(tag.timeline_fps, tag.segment_seconds, stride, tag.timeline_chunk_frames)
    return DecodeOptions(
        config.infer.seg_num,
        config.infer.short_size,
        config.infer.target_size,
        read_options(config),
        timeline,
        tagging and tag.thumbnails,
    )


FRAMES_PER_BLOCK = 512  # decoded crops per output block at most (about 77 MB at 224x224), unless one row has more


def videos_per_call(num_segments: int) -> int:
    """Videos per model call when the config leaves it open: about ``FRAMES_PER_BLOCK`` frames."""
    return max(1, -(-FRAMES_PER_BLOCK // num_segments))


def decode_videos(
    batch: pa.Table,
    options: DecodeOptions,
    storage: StorageSection,
    ledger=None,
    timeout_s: float | None = None,
    drills: tuple[faults.DecodeFault, ...] = (),
) -> Iterator[pa.Table]:
    """(video_id, uri) rows -> ``schema.ROW_SCHEMA`` rows with the sampled crops or the failure, yielded
    in blocks of at most ``FRAMES_PER_BLOCK`` crops (or one row, a video or a timeline chunk, when
    that alone holds more), so that a task holds at most about one block of crops whatever the
    length and number of its videos, and a model actor that takes a block at a time too.

    With a ``DecodeLedger``, a video whose decoding killed the process twice becomes a dead letter,
    and a watchdog kills the process when one video takes over ``timeout_s`` (a hung decoder
    cannot be interrupted from Python). ``drills``: the driver's ``VTP_FAULT_DECODE`` fault drill.
    """
    ids, uris = batch.column(S.VIDEO_ID).to_pylist(), batch.column(S.URI).to_pylist()
    careful, deaths = False, {}
    if ledger is not None:
        block = hashlib.sha1("\n".join(ids).encode()).hexdigest()
        attempt, deaths = ray.get(ledger.begin.remote(block, ids))
        careful = attempt > 0
    crop_bytes = options.target_size * options.target_size * 3
    rows, frames = [], 0
    for vid, uri in zip(ids, uris, strict=True):
        died, timeouts = deaths.get(vid, (0, 0))
        if died >= CRASHES_BEFORE_DEAD_LETTER:
            rows.append(_crashed(vid, uri, died, timeouts, timeout_s))
            continue
        if careful:
            ray.get(ledger.start.remote(vid))
        with _watchdog(ledger, vid, timeout_s):
            for row in _decode_video(vid, uri, options, storage, drills):
                crops = len(row.get(S.FRAMES) or b"") // crop_bytes
                if frames and frames + crops > FRAMES_PER_BLOCK:  # full: it goes out before this row joins
                    yield _rows_table(rows)
                    rows, frames = [], 0
                rows.append(row)
                frames += crops
        if careful:
            ledger.finish.remote(vid)  # after start in the actor's order; no need to wait
    if rows:
        yield _rows_table(rows)


def _rows_table(rows: list[dict]) -> pa.Table:
    """Decoded rows as a ``schema.ROW_SCHEMA`` block, each row's kind in ``ROW_KIND``."""
    kinds = {S.ROW_KIND: S.VIDEO_ROWS}, {S.ROW_KIND: S.CHUNK_ROWS}
    return pa.Table.from_pylist([r | kinds[S.CHUNK in r] for r in rows], schema=S.ROW_SCHEMA)


def _crashed(vid: str, uri: str, died: int, timeouts: int, timeout_s: float | None) -> dict:
    if timeouts:
        error_type = "DecodeTimeout"
        reason = f"reading and decoding this video took over {timeout_s} s in {timeouts} of {died} attempts"
    else:
        error_type = "DecoderCrashed"
        reason = "a crash in the decoder library, or a worker killed for memory"
    message = f"the process decoding this video died {died} times ({reason}); it is not tried again"
    return {S.VIDEO_ID: vid, S.URI: uri} | _failure("decode", error_type, message, time.perf_counter())


@contextlib.contextmanager
def _watchdog(ledger, video_id: str, timeout_s: float | None):
    if timeout_s is None:
        yield
        return

    def kill() -> None:
        log.error("decoding %s took over %s s: killing this worker", video_id, timeout_s)
        if ledger is not None:
            ray.get(ledger.timed_out.remote(video_id))
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Timer(timeout_s, kill)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class _Busy:
    """A video's busy time, handed out to its rows as they are yielded: the time since the last
    row (the consumer's time between rows not counted), split into decode and preprocess (RGB
    conversion where the reader does it, scale and crop: the reader's ``preprocess_seconds``)."""

    def __init__(self) -> None:
        self.mark = time.perf_counter()
        self.preprocess = 0.0

    def take(self, preprocess_total: float) -> dict:
        now = time.perf_counter()
        pre = max(0.0, preprocess_total - self.preprocess)
        out = {S.DECODE_SECONDS: max(0.0, now - self.mark - pre), S.PREPROCESS_SECONDS: pre}
        self.mark, self.preprocess = now, preprocess_total
        return out


def _decode_video(
    video_id: str, uri: str, options: DecodeOptions, storage: StorageSection, drills: tuple[faults.DecodeFault, ...]
) -> Iterator[dict]:
    """One video's rows: its timeline chunks first (with ``options.timeline``), then its own row
    with the sampled crops, or a failure row. With a timeline, one decode gives both (``video.
    reader.read_frames_and_timeline``). A video whose timeline fails after some chunks is a
    failure: the segments output drops those chunks' windows at the end of the run."""
    start = time.perf_counter()
    busy = _Busy()
    row = {S.VIDEO_ID: video_id, S.URI: uri}
    faults.act_on_decode(drills, uri)
    sampling = infer_plan(options.num_segments, options.short_size, options.target_size)
    try:
        with local_copy(uri, storage) as path:
            if options.timeline is None:
                clip = read_frames(path, *sampling, options.read)
            else:
                timeline = options.timeline
                info, frames = read_frames_and_timeline(
                    path, *sampling, timeline.fps, options.read, hold_frames=timeline.chunk_frames
                )
                yield from _timeline_rows(video_id, uri, info, frames, options, busy)
                clip = info.sampled
    except BadVideo as bad:
        yield row | _failure(bad.stage, bad.error_type, bad.message, start)
        return
    except OSError as exc:  # the object store or file system refused the read
        yield row | _failure("read", type(exc).__name__, str(exc), start)
        return
    thumbnail = thumbnail_jpeg(clip.frames[len(clip.frames) // 2]) if options.thumbnails else None
    preprocessed = clip.preprocess_seconds if options.timeline is None else info.preprocess_seconds
    yield row | {
        S.FRAMES: clip.frames.tobytes(),
        S.NUM_FRAMES: clip.num_frames,
        S.FRAME_INDICES: clip.indices.tolist(),
        S.FPS: clip.fps,
        S.WIDTH: clip.width,
        S.HEIGHT: clip.height,
        S.DECODER: clip.decoder,
        S.THUMBNAIL: thumbnail,
        **busy.take(preprocessed),
    }


def _timeline_rows(video_id: str, uri: str, info, frames, options: DecodeOptions, busy: _Busy) -> Iterator[dict]:
    """The chunk rows of a video's timeline (``windows.chunk_windows``) from the reader's
    ``(info, frames)``, streamed: about ``timeline.chunk_frames`` crops at a time, whatever the
    video's length."""
    timeline = options.timeline
    try:
        chunks = chunk_windows(
            frames, timeline.segment_s, timeline.stride_s, lambda: info.end_s or info.duration_s, timeline.chunk_frames
        )
        for chunk in chunks:
            wins = chunk.windows
            thumbs = None
            if options.thumbnails:  # each window's middle frame
                thumbs = [thumbnail_jpeg(chunk.items[(w.frames.start + w.frames.stop - 1) // 2]) for w in wins]
            yield {
                S.VIDEO_ID: video_id,
                S.URI: uri,
                S.FRAMES: b"".join(np.ascontiguousarray(item) for item in chunk.items),  # one copy
                S.NUM_FRAMES: len(chunk.items),
                S.FPS: timeline.fps,
                S.DECODER: info.decoder,
                S.CHUNK: chunk.index,
                S.LAST_CHUNK: chunk.last,
                S.VIDEO_END_S: max(float(info.end_s or info.duration_s), chunk.times[-1]) if chunk.last else None,
                S.NEW_FROM: chunk.new_from,
                S.T_SECONDS: chunk.times,
                S.WIN_INDEX: [w.index for w in wins],
                S.WIN_START: [w.start_s for w in wins],
                S.WIN_END: [w.end_s for w in wins],
                S.WIN_LO: [w.frames.start for w in wins],
                S.WIN_HI: [w.frames.stop for w in wins],
                S.WIN_THUMBS: thumbs,
                S.TIMELINE_FRAMES: len(chunk.items) - chunk.new_from,
                S.WINDOWS: len(wins),
                **busy.take(info.preprocess_seconds),
            }
            del chunk, thumbs  # not held while the next chunk decodes
    except BadVideo as bad:
        raise BadVideo(bad.stage, bad.error_type, f"the timeline at {timeline.fps} frames/s: {bad.message}") from bad
    except NoWindow as exc:
        raise BadVideo("decode", "NoWindows", f"the timeline at {timeline.fps} frames/s: {exc}") from exc


def _failure(stage: str, error_type: str, message: str, start: float) -> dict:
    return S.failure(stage, error_type, redact(message)) | {
        S.DECODE_SECONDS: time.perf_counter() - start,
        S.PREPROCESS_SECONDS: 0.0,
    }


def decode_stage(ds, config: Config, sizes: R.PipelineSizes, tagging: bool = False):
    """Adds the decode tasks to a dataset of ``(video_id, uri, size_bytes)`` blocks, one task a
    block, sized by ``sizes`` (``resources.decode_*``); ``tagging``: as ``decode_options`` says."""
    res = config.resources
    return map_cpu_tasks(
        ds,
        decode_videos,
        batch_size=None,  # a block per task, as pipeline.first_stage_input made them
        num_cpus=sizes.task_cpus,
        concurrency=sizes.task_concurrency,
        max_retries=res.decode_max_retries + CRASHES_BEFORE_DEAD_LETTER * res.decode_batch_size,
        fn_kwargs={
            "options": decode_options(config, tagging),
            "storage": config.storage,
            "ledger": decode_ledger(),
            "timeout_s": config.extract.decode_timeout_s,
            "drills": faults.decode_faults(),
        },
    )
