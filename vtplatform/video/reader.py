"""Reading a video's frames: the frames a sampling plan asks for (``read_frames``), or every frame
in order (``iter_all_frames``), never the whole video in memory. Extraction, tagging, training,
evaluation and the frame cache all read through here, so a cached frame is the same array the
video path would have produced. Time-localized tagging reads frames at a fixed rate of
presentation time (``iter_timeline``), streaming.

A plan is ``choose(num_frames) -> indices`` (any indices, any order, repeats allowed) and
``per_frame(rgb)``, applied to each decoded RGB frame (H, W, 3) uint8 as soon as it is decoded (a
scale, or a scale and a crop), so at most ``chunk_frames`` full-size frames are held at a time.
``infer_plan`` is VideoTag's inference plan, the one extraction and tagging use.

One decoder choice serves both readers (``ReadOptions.decoder``: ``auto``, or ``decord`` or
``pyav`` forced). With ``auto``, decord decodes the files it decodes exactly: H.264, HEVC, VP8/9,
MJPEG and FFV1 (and MPEG-1/2/4 Part 2 without B-frames) in MP4/MOV, Matroska/WebM, AVI and FLV,
up to ``decord_max_frames`` frames. It seeks and decodes only what the plan needs.

PyAV takes everything else, in one streaming pass that converts only the chosen frames
(decoder ``pyav-stream``; the frame count comes from demuxing alone):
* long videos: decord's demuxer thread reads ahead into an unbounded packet queue and its index
  grows with the file, so its memory grows with length; the stream holds one frame at a time and
  runs at ffmpeg's own decoding speed;
* MPEG-1/2/4 Part 2 with B-frames, MPEG-PS/TS, ASF/WMV and other containers: there decord's
  seeking returns the wrong frames (a neighbour, or frames out of order), silently.
Files decord rejects (truncated, damaged, codecs its bundled FFmpeg lacks), and files where fewer
frames decode than packets were counted, go through PyAV in two passes, counting the decodable
frames first (decoder ``pyav``): PyAV skips packets it cannot decode, the way VideoTag's OpenCV
loop skipped failed reads.
"""

from __future__ import annotations

import logging
import math
import os
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
    chunk_frames: int = 8  # full-size frames held at once
    decord_max_frames: int = 1200  # longer videos stream through PyAV (decoder "auto")


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


def infer_plan(num_segments: int, short_size: int = 256, target_size: int = 224) -> tuple[ChooseFn, FrameFn]:
    """VideoTag's inference plan (extraction, tagging): ``infer_indices`` and a centre crop of each frame."""
    return (lambda n: infer_indices(n, num_segments)), (lambda rgb: scale_and_crop(rgb, short_size, target_size))


def read_frames(path: str, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions) -> Frames:
    """Decodes the frames ``choose(num_frames)`` picks from the local file ``path``.

    ``choose`` is called again when a decoder falls back (with the new decoder's frame count).
    Raises ``BadVideo`` for anything wrong with the file; ``ValueError`` for indices outside the
    video; other exceptions are our bugs.
    """
    return _decode(
        path,
        options,
        on_decord=lambda reader: _read_decord(reader, choose, per_frame, options),
        on_pyav=lambda: _read_pyav(path, choose, per_frame, options),
        on_stream=lambda: (
            _stream_pyav(path, choose, per_frame, options) or _read_pyav(path, choose, per_frame, options)
        ),
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
    import av

    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    _check_readable(path)
    rate = Fraction(fps).limit_denominator(1_000_000)
    container = _open_pyav(path)  # raises BadVideo now for a file PyAV cannot open
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
    info = TimelineInfo(float(avg) if avg else 0.0, max(duration, 0.0))
    step = 1 / Fraction(avg) if avg else Fraction(0)

    def frames() -> Iterator[tuple[float, np.ndarray]]:
        zero, t, next_tick, decoded = origin, None, 0, 0
        try:
            for frame in _pyav_frames(path, options.threads):
                decoded += 1
                if frame.pts is None:
                    t = Fraction(0) if t is None else t + step
                else:
                    if zero is None:
                        zero = frame.pts
                    t = (frame.pts - zero) * (frame.time_base or time_base)
                end = float(t + (frame.duration * (frame.time_base or time_base) if frame.duration else step))
                info.end_s = max(end, info.end_s or 0.0)
                if t * rate < next_tick:
                    continue
                next_tick = math.floor(t * rate) + 1
                yield float(t), per_frame(_display_rgb(frame))
        except av.error.FFmpegError as exc:
            raise BadVideo("decode", "DecodeError", f"PyAV: {exc}") from exc
        if not decoded:
            raise BadVideo("decode", "NoFrames", "no frame of the video stream could be decoded")

    return info, frames()


def _decode(
    path: str, options: ReadOptions, on_decord: Callable, on_pyav: Callable[[], T], on_stream: Callable[[], T]
) -> T:
    """The decoder choice: ``on_decord(reader)`` decodes with decord; ``on_stream()`` with PyAV for
    the files ``auto`` keeps from decord (long, or where its seeking is wrong); ``on_pyav()`` with
    PyAV when it is forced or decord rejects the file."""
    _check_readable(path)
    if options.decoder == "pyav":
        return on_pyav()
    if options.decoder == "auto":
        info = probe(path)
        if info is not None and (not info.decord_exact or info.frames > options.decord_max_frames):
            return on_stream()
    try:
        import decord

        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=options.threads)
        if options.decoder == "auto" and len(reader) > options.decord_max_frames:  # a header that said less
            del reader
            return on_stream()
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
) -> Frames:
    """The result, from the transformed frames of ``unique`` (sorted) in order."""
    shapes = {f.shape for f in out}
    if len(shapes) != 1:
        raise BadVideo("decode", "InconsistentFrameSize", f"frames of different sizes after scaling: {sorted(shapes)}")
    frames = np.stack(out)[np.searchsorted(unique, indices)]
    return Frames(frames, indices, num_frames, fps, int(size[1]), int(size[0]), decoder)


def _read_decord(reader, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions) -> Frames:
    num_frames = len(reader)
    if num_frames < 1:
        raise BadVideo("decode", "NoFrames", "the video stream has no frames")
    indices = _check_indices(choose(num_frames), num_frames)
    unique = np.unique(indices)
    out, size = [], (0, 0)
    for start in range(0, len(unique), options.chunk_frames):
        batch = reader.get_batch(unique[start : start + options.chunk_frames].tolist()).asnumpy()
        size = batch.shape[1:3]  # decord applies the display rotation itself
        out.extend(per_frame(f) for f in batch)
        del batch
    return _frames(out, unique, indices, num_frames, float(reader.get_avg_fps()), size, "decord")


def _stream_pyav(path: str, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions) -> Frames | None:
    """One PyAV pass, converting only the chosen frames; the frame count comes from demuxing
    alone. None when fewer frames decode than packets were counted (a damaged file): the caller
    then counts decodable frames first."""
    num_frames = _count_packets(path)
    if num_frames < 1:
        return None
    indices = _check_indices(choose(num_frames), num_frames)
    unique = np.unique(indices)
    out, size = _pick_pyav(path, unique, per_frame, options.threads)
    if len(out) != len(unique):
        log.info("%s: only some of its %d packets decode; counting decodable frames", path, num_frames)
        return None
    return _frames(out, unique, indices, num_frames, _pyav_fps(path), size, "pyav-stream")


def _read_pyav(path: str, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions) -> Frames:
    num_frames = _pyav_count(path, options.threads)  # pass 1: count, keep nothing
    indices = _check_indices(choose(num_frames), num_frames)
    unique = np.unique(indices)
    out, size = _pick_pyav(path, unique, per_frame, options.threads)  # pass 2: keep the chosen ones
    if len(out) != len(unique):
        raise BadVideo(
            "decode", "UnstableDecode", f"decoded {len(out)} of {len(unique)} sampled frames on the second pass"
        )
    return _frames(out, unique, indices, num_frames, _pyav_fps(path), size, "pyav")


def _pick_pyav(
    path: str, unique: np.ndarray, per_frame: FrameFn, threads: int
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """``per_frame`` of the frames whose ordinals are in ``unique`` (sorted), in one decoding pass."""
    wanted = set(unique.tolist())
    out, size = [], (0, 0)
    for ordinal, frame in enumerate(_pyav_frames(path, threads)):
        if ordinal in wanted:
            rgb = _display_rgb(frame)
            size = rgb.shape[:2]
            out.append(per_frame(rgb))
        if ordinal >= unique[-1]:
            break
    return out, size


def _all_decord(reader, per_frame: FrameFn, options: ReadOptions) -> tuple[StreamInfo, Iterator[np.ndarray]]:
    num_frames = len(reader)
    if num_frames < 1:
        raise BadVideo("decode", "NoFrames", "the video stream has no frames")
    first = reader.get_batch([0]).asnumpy()  # fails here, before anything is yielded, on most bad files
    del first
    info = StreamInfo(num_frames, float(reader.get_avg_fps()), "decord")

    def frames() -> Iterator[np.ndarray]:
        for start in range(0, num_frames, options.chunk_frames):
            try:
                batch = reader.get_batch(list(range(start, min(start + options.chunk_frames, num_frames)))).asnumpy()
            except Exception as exc:
                if _is_decord_error(exc):
                    raise BadVideo("decode", "DecodeError", f"decord, frame {start}: {_first_line(exc)}") from exc
                raise
            for f in batch:
                yield per_frame(f)
            del batch

    return info, frames()


def _all_pyav(path: str, per_frame: FrameFn, options: ReadOptions) -> tuple[StreamInfo, Iterator[np.ndarray]]:
    import av

    fps = _pyav_fps(path)  # raises BadVideo now for a file PyAV cannot open

    def frames() -> Iterator[np.ndarray]:
        try:
            for frame in _pyav_frames(path, options.threads):
                yield per_frame(_display_rgb(frame))
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


def _pyav_frames(path: str, threads: int) -> Iterator:
    """Yields every frame PyAV can decode: a packet that fails to decode is skipped (as VideoTag
    skipped failed reads), and a demuxing error ends the stream there."""
    import av

    container = _open_pyav(path)
    try:
        stream = container.streams.video[0]
        stream.thread_count = threads
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as exc:
                log.info("%s: demuxing stopped early: %s", path, exc)
                break
            try:
                yield from packet.decode()
            except av.error.FFmpegError:
                continue
    finally:
        container.close()


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


def _count_packets(path: str) -> int:
    """Video packets in the file, by demuxing alone (no decoding): a long video's frame count."""
    import av

    container = _open_pyav(path)
    try:
        return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
    except av.error.FFmpegError as exc:
        raise BadVideo("decode", "DecodeError", f"PyAV cannot demux the file: {exc}") from exc
    finally:
        container.close()


def _display_rgb(frame) -> np.ndarray:
    """A PyAV frame as RGB (H, W, 3) uint8, turned the way its display matrix says (decord does this itself)."""
    return np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), (frame.rotation // 90) % 4))


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
