"""Sampled decoding: a video file -> its VideoTag segment crops, never the whole video in memory.

decord decodes first, for the files it decodes exactly: H.264, HEVC, VP8/9, MJPEG and FFV1 (and
MPEG-1/2/4 Part 2 without B-frames) in MP4/MOV, Matroska/WebM, AVI and FLV, up to
``decord_max_frames`` frames. It seeks and decodes only what the sampled frames need.

PyAV takes everything else, in one pass that converts only the sampled frames:
* long videos: decord's demuxer thread reads ahead into an unbounded packet queue and its index
  grows with the file, so its memory grows with length; the stream holds one frame at a time and
  runs at ffmpeg's own decoding speed;
* MPEG-1/2/4 Part 2 with B-frames, MPEG-PS/TS, ASF/WMV and other containers: there decord's
  seeking returns the wrong frames (a neighbour, or frames out of order), silently;
* files decord rejects (truncated, damaged, codecs its bundled FFmpeg lacks): PyAV skips packets
  it cannot decode, the way VideoTag's OpenCV loop skipped failed reads.

Every path holds at most one chunk of full-size frames plus the (seg, 224, 224, 3) crops.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vtplatform.video.sampling import infer_indices
from vtplatform.video.transforms import scale_and_crop

log = logging.getLogger(__name__)


class BadVideo(Exception):
    """A video that cannot be used, for a reason that belongs to the input, not to our code."""

    def __init__(self, stage: str, error_type: str, message: str):
        super().__init__(f"{error_type}: {message}")
        self.stage = stage
        self.error_type = error_type
        self.message = message


@dataclass(frozen=True)
class DecodeOptions:
    num_segments: int = 300
    short_size: int = 256
    target_size: int = 224
    decoder: str = "auto"
    threads: int = 1
    chunk_frames: int = 8
    decord_max_frames: int = 1200  # longer videos stream through PyAV (decoder "auto")


@dataclass
class SampledClip:
    frames: np.ndarray  # (seg, target, target, 3) uint8 RGB crops
    indices: np.ndarray  # (seg,) int32, index into the decoded frames
    num_frames: int
    fps: float
    width: int  # as displayed (after rotation), before scaling
    height: int
    decoder: str


def sample_clip(path: str, options: DecodeOptions) -> SampledClip:
    """Decodes the VideoTag inference samples of the local file ``path``.

    Raises ``BadVideo`` for anything wrong with the file; other exceptions are our bugs.
    """
    check_readable(path)
    if options.decoder == "pyav":
        return _sample_pyav(path, options)
    if options.decoder == "auto":
        info = probe(path)
        if info is not None and (not info.decord_exact or info.frames > options.decord_max_frames):
            return _stream_pyav(path, options) or _sample_pyav(path, options)
    try:
        import decord

        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=options.threads)
        if options.decoder == "auto" and len(reader) > options.decord_max_frames:  # a header that said less
            del reader
            return _stream_pyav(path, options) or _sample_pyav(path, options)
        return _sample_decord(reader, options)
    except BadVideo:
        raise
    except Exception as exc:  # decord raises RuntimeError or DECORDError (an Exception subclass)
        if not _is_decord_error(exc):
            raise
        if options.decoder == "decord":
            raise BadVideo("decode", "DecodeError", f"decord: {_first_line(exc)}") from exc
        log.info("decord rejected %s (%s); trying PyAV", path, _first_line(exc))
        try:
            return _sample_pyav(path, options)
        except BadVideo as bad:
            bad.message = f"{bad.message} (decord: {_first_line(exc)})"
            raise


def check_readable(path: str) -> None:
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


def _assemble(unique: np.ndarray, crops: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return crops[np.searchsorted(unique, indices)]


def _sample_decord(reader, options: DecodeOptions) -> SampledClip:
    num_frames = len(reader)
    if num_frames < 1:
        raise BadVideo("decode", "NoFrames", "the video stream has no frames")
    indices = infer_indices(num_frames, options.num_segments)
    unique = np.unique(indices)
    crops, size = [], (0, 0)
    for start in range(0, len(unique), options.chunk_frames):
        batch = reader.get_batch(unique[start : start + options.chunk_frames].tolist()).asnumpy()
        size = batch.shape[1:3]  # decord applies the display rotation itself
        crops.extend(scale_and_crop(f, options.short_size, options.target_size) for f in batch)
        del batch
    return SampledClip(
        frames=_assemble(unique, np.stack(crops), indices),
        indices=indices.astype(np.int32),
        num_frames=num_frames,
        fps=float(reader.get_avg_fps()),
        width=int(size[1]),
        height=int(size[0]),
        decoder="decord",
    )


def open_pyav(path: str):
    import av

    try:
        container = av.open(path)
    except av.error.FFmpegError as exc:
        raise BadVideo("decode", "DecodeError", f"PyAV cannot open the file: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise BadVideo("decode", "NoVideoStream", "the file has no video stream")
    return container


def pyav_frames(path: str, threads: int) -> Iterator:
    """Yields every frame PyAV can decode: a packet that fails to decode is skipped (as VideoTag
    skipped failed reads), and a demuxing error ends the stream there."""
    import av

    container = open_pyav(path)
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

    container = open_pyav(path)
    try:
        return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
    except av.error.FFmpegError as exc:
        raise BadVideo("decode", "DecodeError", f"PyAV cannot demux the file: {exc}") from exc
    finally:
        container.close()


def _stream_pyav(path: str, options: DecodeOptions) -> SampledClip | None:
    """One PyAV pass over a long video, converting only the sampled frames; the frame count comes
    from demuxing alone. None when fewer frames decode than packets were counted (a damaged
    file): the caller then counts decodable frames first."""
    num_frames = _count_packets(path)
    if num_frames < 1:
        return None
    indices = infer_indices(num_frames, options.num_segments)
    unique = np.unique(indices)
    crops, size = _pyav_crops(path, options, unique)
    if len(crops) != len(unique):
        log.info("%s: only some of its %d packets decode; counting decodable frames", path, num_frames)
        return None
    return _pyav_clip(path, indices, unique, crops, size, num_frames, "pyav-stream")


def _pyav_crops(path: str, options: DecodeOptions, unique: np.ndarray) -> tuple[list[np.ndarray], tuple[int, int]]:
    """The crops of the frames whose ordinals are in ``unique`` (sorted), in one decoding pass."""
    wanted = set(unique.tolist())
    crops, size = [], (0, 0)
    for ordinal, frame in enumerate(pyav_frames(path, options.threads)):
        if ordinal in wanted:
            rgb = display_rgb(frame)
            size = rgb.shape[:2]
            crops.append(scale_and_crop(rgb, options.short_size, options.target_size))
        if ordinal >= unique[-1]:
            break
    return crops, size


def _sample_pyav(path: str, options: DecodeOptions) -> SampledClip:
    num_frames = pyav_count(path, options.threads)  # pass 1: count, keep nothing
    indices = infer_indices(num_frames, options.num_segments)
    unique = np.unique(indices)
    crops, size = _pyav_crops(path, options, unique)  # pass 2: keep the samples
    if len(crops) != len(unique):
        raise BadVideo(
            "decode", "UnstableDecode", f"decoded {len(crops)} of {len(unique)} sampled frames on the second pass"
        )
    return _pyav_clip(path, indices, unique, crops, size, num_frames, "pyav")


def _pyav_clip(
    path: str,
    indices: np.ndarray,
    unique: np.ndarray,
    crops: list[np.ndarray],
    size: tuple[int, int],
    num_frames: int,
    decoder: str,
) -> SampledClip:
    return SampledClip(
        frames=_assemble(unique, np.stack(crops), indices),
        indices=indices.astype(np.int32),
        num_frames=num_frames,
        fps=pyav_fps(path),
        width=int(size[1]),
        height=int(size[0]),
        decoder=decoder,
    )


def display_rgb(frame) -> np.ndarray:
    """A PyAV frame as RGB (H, W, 3) uint8, turned the way its display matrix says (decord does this itself)."""
    return np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), (frame.rotation // 90) % 4))


def pyav_count(path: str, threads: int) -> int:
    """How many frames PyAV can decode (decoding everything, keeping nothing)."""
    import av

    try:
        num_frames = sum(1 for _ in pyav_frames(path, threads))
    except av.error.FFmpegError as exc:
        raise BadVideo("decode", "DecodeError", f"PyAV: {exc}") from exc
    if num_frames < 1:
        raise BadVideo("decode", "NoFrames", "no frame of the video stream could be decoded")
    return num_frames


def pyav_fps(path: str) -> float:
    container = open_pyav(path)
    try:
        rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
        return float(rate) if rate else 0.0
    finally:
        container.close()
