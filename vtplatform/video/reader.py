"""Reading a video's frames: the frames a sampling plan asks for (``read_frames``), or every frame
in order (``iter_all_frames``), never the whole video in memory. Extraction, tagging, training,
evaluation and the frame cache all read through here, so a cached frame is the same array the
video path would have produced. Time-localized tagging reads frames at a fixed rate of
presentation time (``iter_timeline``), streaming, and with the sampled frames from the same decode
(``read_frames_and_timeline``).

A plan is ``choose(num_frames) -> indices`` (any indices, any order, repeats allowed) and
``per_frame(rgb)``, applied to each decoded RGB frame (H, W, 3) uint8 as soon as it is decoded (a
scale, or a scale and a crop), so one full-size frame is held at a time.
``infer_plan`` is VideoTag's inference plan, the one extraction and tagging use.

One decoder choice serves both readers (``ReadOptions.decoder``: ``auto``, or ``decord`` or
``pyav`` forced). With ``auto``, PyAV decodes a file once, up to the last frame a plan picks,
converting only the picks (decoder ``pyav-stream``; the frame count and the keyframes come from
demuxing alone). PyAV's FFmpeg decodes at about ffmpeg's own pace; decord's bundled FFmpeg 4.1
costs more a frame (1.2-1.9x the reader's PyAV pass for extraction's samples, in
``benchmarks/extract.py``). So decord takes only what its seeking makes much cheaper: sparse plans
(training's 3 frames a clip) in files whose keyframes are closer than the picks, where seeking
decodes under a third of the frames (``_seeking_pays``), and only files it seeks exactly: H.264,
HEVC, VP8/9, MJPEG and FFV1 (and MPEG-1/2/4 Part 2 without B-frames) in MP4/MOV, Matroska/WebM,
AVI and FLV, up to ``decord_max_frames`` frames (its demuxer thread reads ahead into an unbounded
packet queue and its index grows with the file; 0: never). Elsewhere its seeking returns the wrong
frames (a neighbour, or frames out of order), silently: MPEG-1/2/4 Part 2 with B-frames,
MPEG-PS/TS, ASF/WMV. Reads of every frame or of a timeline always take PyAV's pass. decord and
PyAV give the same bytes on the files both read exactly (the tests compare their whole RGB frames,
and the crop digests). The stream holds one frame at a time, so memory does not grow with a
video's length. Files decord rejects (truncated, damaged, codecs its bundled FFmpeg lacks), and
files where fewer frames decode than packets were counted, go through PyAV in two passes, counting
the decodable frames first (decoder ``pyav``): PyAV skips packets it cannot decode, the way
VideoTag's OpenCV loop skipped failed reads.

PyAV's frames go to RGB through one converter per stream (``_Prep``), and only the frames a plan
or a timeline picks are converted. The time spent converting and in ``per_frame`` is reported
(``preprocess_seconds``) apart from the rest, decoding.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

import numpy as np

from vtplatform.config import Config
from vtplatform.video.sampling import infer_indices
from vtplatform.video.transforms import scale_and_crop

log = logging.getLogger(__name__)

FrameFn = Callable[[np.ndarray], np.ndarray]
ChooseFn = Callable[[int], np.ndarray]
T = TypeVar("T")


class BadVideo(Exception):
    """A video that cannot be used, for a reason that belongs to the input, not to our code."""

    def __init__(self, stage: str, error_type: str, message: str):
        super().__init__(f"{error_type}: {message}")
        self.stage = stage
        self.error_type = error_type
        self.message = message


@dataclass(frozen=True)
class ReadOptions:
    decoder: str = "auto"  # auto | decord | pyav
    threads: int = 1
    chunk_frames: int = 8  # full-size frames held at once, at most (the readers hold one)
    decord_max_frames: int = 1200  # decoder "auto": decord may seek in files it reads exactly up to this long


def read_options(config: Config) -> ReadOptions:
    """The reader's options from ``extract.*``: the same for every phase that reads videos."""
    x = config.extract
    return ReadOptions(x.decoder, x.decode_threads, x.chunk_frames, x.decord_max_frames)


@dataclass
class Frames:
    frames: np.ndarray  # (K, h, w, 3) uint8: per_frame(decoded frame) for each chosen index
    indices: np.ndarray  # (K,) int64, into the decoded frames
    num_frames: int
    fps: float
    width: int  # decoded frame size, as displayed (after rotation), before per_frame
    height: int
    decoder: str  # decord | pyav | pyav-stream
    preprocess_seconds: float = 0.0  # of the time to read: converting to RGB (PyAV) and per_frame


def infer_plan(num_segments: int, short_size: int = 256, target_size: int = 224) -> tuple[ChooseFn, FrameFn]:
    """VideoTag's inference plan (extraction, tagging): ``infer_indices`` and a centre crop of each frame."""
    return (lambda n: infer_indices(n, num_segments)), (lambda rgb: scale_and_crop(rgb, short_size, target_size))


def read_frames(path: str, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions) -> Frames:
    """Decodes the frames ``choose(num_frames)`` picks from the local file ``path``.

    ``choose`` is called again when a decoder falls back (with the new decoder's frame count).
    Raises ``BadVideo`` for anything wrong with the file; ``ValueError`` for indices outside the
    video; other exceptions are our bugs.
    """
    if options.decoder == "auto":
        _check_readable(path)
        return _read_auto(path, choose, per_frame, options)
    return _decode(
        path,
        options,
        on_decord=lambda reader: _read_decord(reader, choose, per_frame, options),
        on_pyav=lambda: _read_pyav(path, choose, per_frame, options),
        on_stream=lambda: _read_auto(path, choose, per_frame, options),
    )


@dataclass
class StreamInfo:
    num_frames: int  # known up front with decord; -1 with PyAV until the stream ends
    fps: float
    decoder: str  # decord | pyav


def iter_all_frames(path: str, per_frame: FrameFn, options: ReadOptions) -> tuple[StreamInfo, Iterator[np.ndarray]]:
    """Every frame of ``path`` in order, through ``per_frame``, one chunk of full-size frames at a time.

    The decoder is chosen when the file is opened, as for ``read_frames`` (PyAV streams what
    ``read_frames`` would stream); a decord failure in the middle of the stream raises
    ``BadVideo`` rather than switching decoders, since the frames already yielded would
    otherwise be repeated.
    """
    return _decode(
        path,
        options,
        on_decord=lambda reader: _all_decord(reader, per_frame, options),
        on_pyav=lambda: _all_pyav(path, per_frame, options),
        on_stream=lambda: _all_pyav(path, per_frame, options),
    )


@dataclass
class TimelineInfo:
    fps: float  # the stream's average frame rate, from the header; 0.0 if unknown
    duration_s: float  # the video's duration as the header says it (approximate); 0.0 if unknown
    end_s: float | None = None  # set as frames decode: the latest decoded frame's time + duration
    decoder: str = "pyav"
    preprocess_seconds: float = 0.0  # so far: converting to RGB (PyAV) and per_frame
    sampled: Frames | None = None  # read_frames_and_timeline: the sampled frames, once the timeline is exhausted


def iter_timeline(
    path: str, fps: float, per_frame: FrameFn, options: ReadOptions
) -> tuple[TimelineInfo, Iterator[tuple[float, np.ndarray]]]:
    """The frames of ``path`` at ``fps`` frames per second of presentation time, streamed:
    ``(t_seconds, per_frame(rgb))`` for each picked frame, in order, one full-size frame at a time.

    The tick rule: tick ``k`` is at ``k / fps`` seconds and takes the first decoded frame whose
    time is at or after it. Each frame is yielded at most once, with its own time (not the
    tick's): a frame that is the first at or after several ticks (after a gap in a
    variable-frame-rate file) serves them all and is yielded once, and a file with fewer frames a
    second than ``fps`` yields every frame. Times are presentation timestamps (PTS), exact
    fractions of the stream's time base, in seconds from the stream's ``start_time`` (the first
    decoded frame's PTS when the header has none), so tick 0 takes the first frame and the times
    strictly increase; frames before the start are skipped. A frame without a PTS is placed one
    average frame interval after the frame before it.

    Only picked frames are converted to RGB (turned as the display matrix says, as the reader
    does). Always PyAV, one pass, whatever ``options.decoder`` says (``options.threads``
    applies), so memory does not grow with the video's length; undecodable packets are skipped,
    as everywhere in the reader. ``info.end_s``, the video's end by its timestamps (the latest
    decoded frame's time plus its duration), is final once the iterator is exhausted: the
    duration to give ``segments.windows``. Raises ``BadVideo`` for a file that cannot be opened
    (now) or has no decodable frame (from the iterator, at its end); ``ValueError`` for
    ``fps <= 0``.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    _check_readable(path)
    return _timeline(path, fps, _Prep(per_frame), options)


def _timeline(path: str, fps: float, prep: _Prep, options: ReadOptions) -> tuple[TimelineInfo, Iterator]:
    import av

    info, ticks = _timeline_start(path, fps)  # raises BadVideo now for a file PyAV cannot open
    info.preprocess_seconds = prep.seconds

    def frames() -> Iterator[tuple[float, np.ndarray]]:
        decoded = 0
        try:
            for frame in _pyav_frames(path, options.threads):
                decoded += 1
                t = ticks.take(frame.pts, frame.duration, frame.time_base)
                info.end_s = ticks.end_s
                if t is not None:
                    crop = prep.pyav(frame)
                    info.preprocess_seconds = prep.seconds
                    yield t, crop
        except av.error.FFmpegError as exc:
            raise BadVideo("decode", "DecodeError", f"PyAV: {exc}") from exc
        if not decoded:
            raise BadVideo("decode", "NoFrames", "no frame of the video stream could be decoded")

    return info, frames()


def read_frames_and_timeline(
    path: str, choose: ChooseFn, per_frame: FrameFn, fps: float, options: ReadOptions, hold_frames: int = 512
) -> tuple[TimelineInfo, Iterator[tuple[float, np.ndarray]]]:
    """``read_frames`` and ``iter_timeline`` of one file from one decode, with ``per_frame`` for both.

    The iterator yields what ``iter_timeline(path, fps, per_frame, options)`` yields; once it is
    exhausted, ``info.sampled`` holds what ``read_frames(path, choose, per_frame, options)``
    returns, byte for byte (``read_frames`` may seek with decord for a sparse plan; decord and
    PyAV give the same bytes on the files decord seeks). A frame that is both sampled and on the
    timeline is converted and transformed once.

    * PyAV's one pass (``auto``): the pass that picks the samples goes on to the end for the
      timeline. When fewer frames decode than packets were counted, a second pass picks the
      samples among the frames that decode, as ``read_frames`` does.
    * decord (forced): the timeline's frames are picked by the same tick rule from the presentation
      timestamps of the file's packets (demuxed by PyAV, nothing decoded), and decord decodes the
      samples and those frames in one sequential pass. This needs presentation timestamps
      (MP4/MOV, Matroska/WebM, or a codec without B-frames) on every packet, no two alike, none
      marked to discard, and as many packets as decord has frames:
      then decord's frame ``i`` (presentation order) is the ``i``-th frame the timeline would decode.
      Otherwise, or with more than ``hold_frames`` timeline frames (they are held until decord
      is done; its files are at most ``decord_max_frames`` long), the samples come from decord and
      the timeline from ``iter_timeline``: two decodes, as before.
    * PyAV's two passes (forced, or files decord rejects): the counting pass is the timeline's.

    Raises as ``read_frames`` and ``iter_timeline`` do; errors found while iterating come from the
    iterator.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return _decode(
        path,
        options,
        on_decord=lambda reader: _both_decord(reader, path, choose, per_frame, fps, options, hold_frames),
        on_pyav=lambda: _both_pyav(path, choose, per_frame, fps, options, stream=False),
        on_stream=lambda: _both_pyav(path, choose, per_frame, fps, options, stream=True),
    )


class _Ticks:
    """The timeline's tick rule (``iter_timeline``) over frames in presentation order."""

    def __init__(self, fps: float, origin: int | None, time_base: Fraction, avg: Fraction | None):
        self.rate = Fraction(fps).limit_denominator(1_000_000)
        self.zero, self.time_base = origin, time_base
        self.step = 1 / Fraction(avg) if avg else Fraction(0)
        self.t: Fraction | None = None
        self.next_tick = 0
        self.end_s: float | None = None

    def take(self, pts: int | None, duration: int | None, time_base: Fraction | None) -> float | None:
        """This frame's time when the rule picks it, else None; ``end_s`` follows the frames seen."""
        base = time_base or self.time_base
        if pts is None:
            self.t = Fraction(0) if self.t is None else self.t + self.step
        else:
            if self.zero is None:
                self.zero = pts
            self.t = (pts - self.zero) * base
        t = self.t
        end = float(t + (duration * base if duration else self.step))
        self.end_s = max(end, self.end_s or 0.0)
        if t * self.rate < self.next_tick:
            return None
        self.next_tick = math.floor(t * self.rate) + 1
        return float(t)


def _timeline_start(path: str, fps: float) -> tuple[TimelineInfo, _Ticks]:
    """The header's frame rate and duration, and the tick rule from the stream's start."""
    import av

    container = _open_pyav(path)  # raises BadVideo for a file PyAV cannot open
    try:
        stream = container.streams.video[0]
        time_base, origin = stream.time_base, stream.start_time
        avg = stream.average_rate or stream.guessed_rate
        if stream.duration and time_base:
            duration = float(stream.duration * time_base)
        else:
            duration = container.duration / av.time_base if container.duration else 0.0
    finally:
        container.close()
    return TimelineInfo(float(avg) if avg else 0.0, max(duration, 0.0)), _Ticks(fps, origin, time_base, avg)


def _demuxed_picks(path: str, ticks: _Ticks, num_frames: int) -> list[tuple[int, float]] | None:
    """(frame ordinal, time) of the timeline's frames, from the packets' timestamps alone; None
    where they cannot stand for the decoded frames (see ``read_frames_and_timeline``)."""
    import av

    container = _open_pyav(path)
    try:
        stream = container.streams.video[0]
        if container.format.name not in PTS_CONTAINERS and stream.codec_context.has_b_frames:
            return None  # e.g. AVI: packets carry decode-order stamps; the decoder's reordering decides
        time_base = stream.time_base  # read now: the stream's memory goes with the container
        stamps = []
        for packet in container.demux(stream):
            if not packet.size:
                continue
            if packet.pts is None or packet.is_discard:
                return None
            stamps.append((packet.pts, packet.duration))
    except av.error.FFmpegError:
        return None
    finally:
        container.close()
    stamps.sort()
    if len(stamps) != num_frames or any(a[0] == b[0] for a, b in itertools.pairwise(stamps)):
        return None
    picks = []
    for ordinal, (pts, duration) in enumerate(stamps):
        t = ticks.take(pts, duration, time_base)
        if t is not None:
            picks.append((ordinal, t))
    return picks


def _both_decord(
    reader, path: str, choose: ChooseFn, per_frame: FrameFn, fps: float, options: ReadOptions, hold_frames: int
) -> tuple[TimelineInfo, Iterator[tuple[float, np.ndarray]]]:
    num_frames = len(reader)
    info, ticks = _timeline_start(path, fps)
    picks = _demuxed_picks(path, ticks, num_frames) if num_frames >= 1 else None
    if picks is None or len(picks) > hold_frames:
        sampled = _read_decord(reader, choose, per_frame, options)
        prep = _Prep(per_frame)
        prep.seconds = sampled.preprocess_seconds  # the timeline's time adds to the samples'
        info, frames = _timeline(path, fps, prep, options)
        info.sampled = sampled
        return info, frames
    timeline = dict(picks)
    sampled, crops = _read_decord(reader, choose, per_frame, options, also=np.array(sorted(timeline), np.int64))
    info.sampled, info.end_s, info.decoder = sampled, ticks.end_s, "decord"
    info.preprocess_seconds = sampled.preprocess_seconds
    return info, iter([(timeline[i], crops[i]) for i in sorted(timeline)])


def _both_pyav(
    path: str, choose: ChooseFn, per_frame: FrameFn, fps: float, options: ReadOptions, stream: bool
) -> tuple[TimelineInfo, Iterator[tuple[float, np.ndarray]]]:
    import av

    _check_readable(path)
    info, ticks = _timeline_start(path, fps)
    num_frames = _demux_index(path)[0] if stream else 0
    unique, indices = np.zeros(0, np.int64), None
    if num_frames >= 1:  # PyAV's one pass: the samples are known before decoding
        indices = _check_indices(choose(num_frames), num_frames)
        unique = np.unique(indices)
    wanted = set(unique.tolist())
    last_pick = int(unique[-1]) if unique.size else -1  # where read_frames' pass stops
    prep = _Prep(per_frame)

    def frames() -> Iterator[tuple[float, np.ndarray]]:
        out, decoded, failed, failed_by_last_pick = {}, 0, [], None
        try:
            for ordinal, frame in enumerate(_pyav_frames(path, options.threads, failed)):
                decoded += 1
                if ordinal == last_pick:
                    failed_by_last_pick = len(failed)
                t = ticks.take(frame.pts, frame.duration, frame.time_base)
                info.end_s = ticks.end_s
                if t is None and ordinal not in wanted:
                    continue
                crop = prep.pyav(frame)
                info.preprocess_seconds = prep.seconds
                if ordinal in wanted:
                    out[ordinal] = crop
                if t is not None:
                    yield t, crop
        except av.error.FFmpegError as exc:
            raise BadVideo("decode", "DecodeError", f"PyAV: {exc}") from exc
        if not decoded:
            raise BadVideo("decode", "NoFrames", "no frame of the video stream could be decoded")
        if indices is not None and len(out) == len(unique) and not failed_by_last_pick:
            size = prep.size
            crops = [out[i] for i in unique.tolist()]
            info.sampled = _frames(crops, unique, indices, num_frames, info.fps, size, "pyav-stream", prep.seconds)
            return
        if indices is not None:
            log.info("%s: only some of its %d packets decode; counting decodable frames", path, num_frames)
        # read_frames' two passes: this pass counted the decodable frames; a second one picks.
        second = _Prep(per_frame)
        chosen = _check_indices(choose(decoded), decoded)
        picked = np.unique(chosen)
        crops = _pick_pyav(path, picked, second, options.threads)
        if len(crops) != len(picked):
            raise BadVideo(
                "decode", "UnstableDecode", f"decoded {len(crops)} of {len(picked)} sampled frames on the second pass"
            )
        info.sampled = _frames(crops, picked, chosen, decoded, info.fps, second.size, "pyav", second.seconds)
        info.preprocess_seconds = prep.seconds + second.seconds

    return info, frames()


def _decode(
    path: str, options: ReadOptions, on_decord: Callable, on_pyav: Callable[[], T], on_stream: Callable[[], T]
) -> T:
    """The decoder choice for reads of every frame (or of a timeline): ``on_stream()``, PyAV's one
    pass, with ``auto`` (decord would decode the same frames at a higher cost); ``on_decord(reader)``
    with decord forced; ``on_pyav()`` with PyAV forced, or when forced decord rejects the file.
    (``read_frames`` decides ``auto`` itself: ``_read_auto``.)"""
    _check_readable(path)
    if options.decoder == "pyav":
        return on_pyav()
    if options.decoder == "auto":
        return on_stream()
    try:
        import decord

        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=options.threads)
        return on_decord(reader)
    except BadVideo:
        raise
    except Exception as exc:  # decord raises RuntimeError or DECORDError (an Exception subclass)
        if not _is_decord_error(exc):
            raise
        if options.decoder == "decord":
            raise BadVideo("decode", "DecodeError", f"decord: {_first_line(exc)}") from exc
        log.info("decord rejected %s (%s); trying PyAV", path, _first_line(exc))
        try:
            return on_pyav()
        except BadVideo as bad:
            bad.message = f"{bad.message} (decord: {_first_line(exc)})"
            raise


def _check_readable(path: str) -> None:
    try:
        size = os.stat(path).st_size
        if os.path.isdir(path):
            raise IsADirectoryError(f"is a directory: {path}")
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise BadVideo("read", type(exc).__name__, str(exc)) from exc
    if size == 0:
        raise BadVideo("read", "EmptyFile", f"file is empty: {path}")


def _is_decord_error(exc: BaseException) -> bool:
    from decord._ffi.base import DECORDError

    return isinstance(exc, (RuntimeError, DECORDError))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # decord prefixes messages with "[hh:mm:ss] /src/...cc:NNN:" noise; keep the informative tail.
    text = lines[-1] if lines else type(exc).__name__
    return text[:500]


def _check_indices(indices: np.ndarray, num_frames: int) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0 or indices.min() < 0 or indices.max() >= num_frames:
        raise ValueError(f"chosen frame indices must lie in [0, {num_frames}), got {indices.tolist()[:10]}")
    return indices


def _frames(
    out: list[np.ndarray],
    unique: np.ndarray,
    indices: np.ndarray,
    num_frames: int,
    fps: float,
    size: tuple[int, int],
    decoder: str,
    preprocess_seconds: float,
) -> Frames:
    """The result, from the transformed frames of ``unique`` (sorted) in order."""
    shapes = {f.shape for f in out}
    if len(shapes) != 1:
        raise BadVideo("decode", "InconsistentFrameSize", f"frames of different sizes after scaling: {sorted(shapes)}")
    frames = np.empty((len(indices), *out[0].shape), out[0].dtype)  # one copy of each crop, into place
    for k, i in enumerate(np.searchsorted(unique, indices).tolist()):
        frames[k] = out[i]
    return Frames(frames, indices, num_frames, fps, int(size[1]), int(size[0]), decoder, preprocess_seconds)


class _Prep:
    """``per_frame`` of decoded frames, timed (``seconds``). PyAV frames go to RGB through one
    converter for the whole stream: a single swscale context, on one thread, reused for every
    frame, where ``frame.to_ndarray(format="rgb24")`` set one up per frame (with a thread pool):
    the same conversion (same formats, sizes, colorspace, range and flags; swscale's output does
    not depend on its thread count), without rebuilding it. decord's frames come as RGB arrays."""

    def __init__(self, per_frame: FrameFn):
        self.per_frame = per_frame
        self.seconds = 0.0
        self.size = (0, 0)  # (height, width) of the last RGB frame, as displayed
        self._reformatter = None

    def pyav(self, frame) -> np.ndarray:
        """per_frame of a PyAV frame as RGB, turned the way its display matrix says (decord does this itself)."""
        start = time.perf_counter()
        if self._reformatter is None:
            from av.video.reformatter import VideoReformatter

            self._reformatter = VideoReformatter()
        rgb = self._reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
        rgb = np.ascontiguousarray(np.rot90(rgb, (frame.rotation // 90) % 4))
        self.size = rgb.shape[:2]
        out = self.per_frame(rgb)
        self.seconds += time.perf_counter() - start
        return out

    def rgb(self, rgb: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        self.size = rgb.shape[:2]
        out = self.per_frame(rgb)
        self.seconds += time.perf_counter() - start
        return out


def _read_decord(
    reader, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions, also: np.ndarray | None = None
) -> Frames:
    """The chosen frames through decord. ``also``: more frame ordinals (sorted) decoded in the same
    pass; then returns (frames, {ordinal: per_frame(frame)} of those)."""
    num_frames = len(reader)
    if num_frames < 1:
        raise BadVideo("decode", "NoFrames", "the video stream has no frames")
    indices = _check_indices(choose(num_frames), num_frames)
    unique = np.unique(indices)
    order = unique if also is None else np.union1d(unique, also)
    prep, done = _Prep(per_frame), {}
    for ordinal in order.tolist():
        done[ordinal] = prep.rgb(_decord_frame(reader, ordinal))
    frames = _frames(
        [done[i] for i in unique.tolist()],
        unique,
        indices,
        num_frames,
        float(reader.get_avg_fps()),
        prep.size,
        "decord",
        prep.seconds,
    )
    if also is None:
        return frames
    return frames, {i: done[i] for i in also.tolist()}


class _DLPack:
    """A decord NDArray as numpy's ``from_dlpack`` takes it (decord's ``to_dlpack`` gives the bare capsule)."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **_):
        return self.array.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU: decord.cpu(0)


def _decord_frame(reader, ordinal: int) -> np.ndarray:
    """Frame ``ordinal`` (H, W, 3) uint8 from decord, which applies the display rotation itself.

    One frame a call, shared with numpy without a copy: decord's ``GetBatch`` decodes its indices
    one after another in any case (seeking when the next one is not the frame after the current),
    so a call per frame makes the same seeks and decodes as a batch of them. A batch of several
    full-size frames costs more: its buffer is a fresh allocation on every call (past glibc's mmap
    threshold, so the kernel zeroes its pages again: at 1080p as much system time as the decoding
    itself), and ``asnumpy`` copies it once more."""
    return np.from_dlpack(_DLPack(reader.get_batch([ordinal])))[0]


# decord's CPU seconds a decoded frame against PyAV's, rounded up: its bundled FFmpeg 4.1 and RGB
# filter graph cost 1.2-1.9x the reader's PyAV pass for the same samples (benchmarks/extract.py,
# column decord against the path's), so decord seeks only where it decodes under a third of the frames
DECORD_FRAME_COST = 3.0


def _read_auto(path: str, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions) -> Frames:
    """``read_frames`` with decoder ``auto``. The frame count and the keyframes come from demuxing
    alone, then ``choose`` picks. decord seeks to the picks when that decodes under a third of the
    frames PyAV's pass decodes (``_seeking_pays``: a sparse plan, as training's 3 frames a clip, in
    a file with keyframes closer than the picks) and the file is one it seeks exactly, up to
    ``decord_max_frames`` long. Otherwise (extraction's 300 samples, every clip up to 1200 frames)
    PyAV decodes the file once, up to the last pick, converting only the picks. When a packet up to
    the last pick fails to decode (a damaged file: the frames after it would be one ordinal off),
    when fewer frames than picks decode, or when demuxing fails part-way, PyAV's two passes, which
    count the frames that decode first, as VideoTag did (they decode up to where demuxing stops).
    Damage after the last pick goes unseen: the count is then the packets'."""
    try:
        num_frames, keyframes = _demux_index(path)
    except BadVideo:
        return _read_pyav(path, choose, per_frame, options)
    if num_frames < 1:
        return _read_pyav(path, choose, per_frame, options)
    indices = _check_indices(choose(num_frames), num_frames)
    unique = np.unique(indices)
    if num_frames <= options.decord_max_frames and _seeking_pays(unique, keyframes):
        frames = _seek_decord(path, indices, num_frames, per_frame, options)
        if frames is not None:
            return frames
    prep, failed = _Prep(per_frame), []
    out = _pick_pyav(path, unique, prep, options.threads, failed)
    if failed or len(out) != len(unique):
        log.info("%s: not every packet up to the last pick decodes; counting decodable frames", path)
        return _read_pyav(path, choose, per_frame, options)
    return _frames(out, unique, indices, num_frames, _pyav_fps(path), prep.size, "pyav-stream", prep.seconds)


def _seeking_pays(unique: np.ndarray, keyframes: np.ndarray) -> bool:
    """Whether decord, seeking to the keyframe before each pick unless it is already past that
    keyframe (its ``SeekAccurate``), decodes fewer than ``1 / DECORD_FRAME_COST`` of the frames
    PyAV's pass decodes (every frame up to the last pick). Keyframes are packet ordinals (decode
    order): an estimate where B-frames reorder a few frames around them."""
    if keyframes.size == 0:
        return False
    starts = keyframes[np.maximum(np.searchsorted(keyframes, unique, side="right") - 1, 0)]
    decoded, position = 0, 0
    for pick, key in zip(unique.tolist(), starts.tolist(), strict=True):
        decoded += pick + 1 - max(key, position)
        position = pick + 1
    return decoded * DECORD_FRAME_COST < unique[-1] + 1


def _seek_decord(
    path: str, indices: np.ndarray, num_frames: int, per_frame: FrameFn, options: ReadOptions
) -> Frames | None:
    """decord's read of ``indices``, or None where decord is not exact for the file, counts its
    frames otherwise, or rejects it (then PyAV reads it)."""
    info = probe(path)
    if info is None or not info.decord_exact:
        return None
    try:
        import decord

        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=options.threads)
        if len(reader) != num_frames:
            return None
        return _read_decord(reader, lambda n: indices, per_frame, options)
    except Exception as exc:  # decord raises RuntimeError or DECORDError (an Exception subclass)
        if not _is_decord_error(exc):
            raise
        log.info("decord rejected %s (%s); reading it with PyAV", path, _first_line(exc))
        return None


def _read_pyav(path: str, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions) -> Frames:
    num_frames = _pyav_count(path, options.threads)  # pass 1: count, keep nothing
    indices = _check_indices(choose(num_frames), num_frames)
    unique = np.unique(indices)
    prep = _Prep(per_frame)
    out = _pick_pyav(path, unique, prep, options.threads)  # pass 2: keep the chosen ones
    if len(out) != len(unique):
        raise BadVideo(
            "decode", "UnstableDecode", f"decoded {len(out)} of {len(unique)} sampled frames on the second pass"
        )
    return _frames(out, unique, indices, num_frames, _pyav_fps(path), prep.size, "pyav", prep.seconds)


def _pick_pyav(
    path: str, unique: np.ndarray, prep: _Prep, threads: int, failed: list | None = None
) -> list[np.ndarray]:
    """``prep`` of the frames whose ordinals are in ``unique`` (sorted), in one decoding pass
    (``failed``: see ``_pyav_frames``)."""
    wanted = set(unique.tolist())
    out = []
    for ordinal, frame in enumerate(_pyav_frames(path, threads, failed)):
        if ordinal in wanted:
            out.append(prep.pyav(frame))
        if ordinal >= unique[-1]:
            break
    return out


def _all_decord(reader, per_frame: FrameFn, options: ReadOptions) -> tuple[StreamInfo, Iterator[np.ndarray]]:
    num_frames = len(reader)
    if num_frames < 1:
        raise BadVideo("decode", "NoFrames", "the video stream has no frames")
    first = _decord_frame(reader, 0)  # fails here, before anything is yielded, on most bad files
    info = StreamInfo(num_frames, float(reader.get_avg_fps()), "decord")

    def frames() -> Iterator[np.ndarray]:
        yield per_frame(first)
        for ordinal in range(1, num_frames):
            try:
                frame = _decord_frame(reader, ordinal)
            except Exception as exc:
                if _is_decord_error(exc):
                    raise BadVideo("decode", "DecodeError", f"decord, frame {ordinal}: {_first_line(exc)}") from exc
                raise
            yield per_frame(frame)

    return info, frames()


def _all_pyav(path: str, per_frame: FrameFn, options: ReadOptions) -> tuple[StreamInfo, Iterator[np.ndarray]]:
    import av

    fps = _pyav_fps(path)  # raises BadVideo now for a file PyAV cannot open
    prep = _Prep(per_frame)

    def frames() -> Iterator[np.ndarray]:
        try:
            for frame in _pyav_frames(path, options.threads):
                yield prep.pyav(frame)
        except av.error.FFmpegError as exc:
            raise BadVideo("decode", "DecodeError", f"PyAV: {exc}") from exc

    return StreamInfo(-1, fps, "pyav"), frames()


def _open_pyav(path: str):
    import av

    try:
        container = av.open(path)
    except av.error.FFmpegError as exc:
        raise BadVideo("decode", "DecodeError", f"PyAV cannot open the file: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise BadVideo("decode", "NoVideoStream", "the file has no video stream")
    return container


def _pyav_frames(path: str, threads: int, failed: list | None = None) -> Iterator:
    """Yields every frame PyAV can decode: a packet that fails to decode is skipped (as VideoTag
    skipped failed reads; its ordinal among the packets goes into ``failed``), and a demuxing error
    ends the stream there."""
    import av

    container = _open_pyav(path)
    try:
        stream = container.streams.video[0]
        stream.thread_count = threads
        packets = container.demux(stream)
        ordinal = 0
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as exc:
                log.info("%s: demuxing stopped early: %s", path, exc)
                break
            index = ordinal
            if packet.size:
                ordinal += 1
            try:
                yield from packet.decode()
            except av.error.FFmpegError:
                if failed is not None:
                    failed.append(index)
                continue
    finally:
        container.close()


# Containers whose packets carry presentation timestamps (the timeline's picks can come from demuxing).
PTS_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"}
# Where decord's frame-accurate seeking was checked against PyAV's sequential decoding (tests).
DECORD_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "flv"}
DECORD_CODECS = {"h264", "hevc", "vp8", "vp9", "mjpeg", "ffv1"}
DECORD_CODECS_WITHOUT_B_FRAMES = {"mpeg4", "mpeg1video", "mpeg2video", "msmpeg4v2", "msmpeg4v3", "wmv1", "wmv2"}


@dataclass(frozen=True)
class Probe:
    container: str
    codec: str
    has_b_frames: bool
    frames: int  # declared by the container (or duration x rate); 0 if unknown

    @property
    def decord_exact(self) -> bool:
        """Whether decord returns the right frames for this file when it seeks."""
        if self.container not in DECORD_CONTAINERS:
            return False
        return self.codec in DECORD_CODECS or (self.codec in DECORD_CODECS_WITHOUT_B_FRAMES and not self.has_b_frames)


def probe(path: str) -> Probe | None:
    """What the container header says, without decoding; None when PyAV cannot open the file."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            frames = int(stream.frames or 0)
            if not frames and stream.duration and stream.time_base and stream.average_rate:
                frames = int(float(stream.duration * stream.time_base) * float(stream.average_rate))
            ctx = stream.codec_context
            return Probe(container.format.name, ctx.name, bool(ctx.has_b_frames), frames)
    except av.error.FFmpegError:
        return None


def _demux_index(path: str) -> tuple[int, np.ndarray]:
    """The video packets in the file and the ordinals of its keyframe packets, by demuxing alone."""
    import av

    container = _open_pyav(path)
    count, keyframes = 0, []
    try:
        for packet in container.demux(container.streams.video[0]):
            if packet.size:
                if packet.is_keyframe:
                    keyframes.append(count)
                count += 1
    except av.error.FFmpegError as exc:
        raise BadVideo("decode", "DecodeError", f"PyAV cannot demux the file: {exc}") from exc
    finally:
        container.close()
    return count, np.array(keyframes, np.int64)


def _pyav_count(path: str, threads: int) -> int:
    """How many frames PyAV can decode (decoding everything, keeping nothing)."""
    import av

    try:
        num_frames = sum(1 for _ in _pyav_frames(path, threads))
    except av.error.FFmpegError as exc:
        raise BadVideo("decode", "DecodeError", f"PyAV: {exc}") from exc
    if num_frames < 1:
        raise BadVideo("decode", "NoFrames", "no frame of the video stream could be decoded")
    return num_frames


def _pyav_fps(path: str) -> float:
    container = _open_pyav(path)
    try:
        rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
        return float(rate) if rate else 0.0
    finally:
        container.close()
