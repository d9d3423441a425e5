"""Sampled decoding: a video file -> its VideoTag segment crops, never the whole video in memory.

decord decodes first: it seeks and decodes only what the sampled frames need. Files decord
rejects (truncated, damaged, codecs its bundled FFmpeg lacks) go to PyAV, which skips packets
it cannot decode, the way VideoTag's OpenCV loop skipped failed reads. Both paths hold at most
one chunk of full-size frames at a time plus the (seg, 224, 224, 3) crops.
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

DECODERS = ("auto", "decord", "pyav")


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
    try:
        return _sample_decord(path, options)
    except BadVideo:
        raise
    except Exception as exc:  # decord raises RuntimeError or DECORDError (an Exception subclass)
        if options.decoder == "decord" or not _is_decord_error(exc):
            if _is_decord_error(exc):
                raise BadVideo("decode", "DecodeError", f"decord: {_first_line(exc)}") from exc
            raise
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


def _sample_decord(path: str, options: DecodeOptions) -> SampledClip:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=options.threads)
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
    """Yields every frame PyAV can decode, skipping packets that fail (as VideoTag skipped reads)."""
    import av

    container = _open_pyav(path)
    try:
        stream = container.streams.video[0]
        stream.thread_count = threads
        for packet in container.demux(stream):
            try:
                yield from packet.decode()
            except av.error.FFmpegError:
                continue
    finally:
        container.close()


def _sample_pyav(path: str, options: DecodeOptions) -> SampledClip:
    import av

    try:
        num_frames = sum(1 for _ in _pyav_frames(path, options.threads))  # pass 1: count, keep nothing
    except av.error.FFmpegError as exc:
        raise BadVideo("decode", "DecodeError", f"PyAV: {exc}") from exc
    if num_frames < 1:
        raise BadVideo("decode", "NoFrames", "no frame of the video stream could be decoded")
    indices = infer_indices(num_frames, options.num_segments)
    unique = np.unique(indices)
    wanted = set(unique.tolist())
    crops, size = [], (0, 0)
    for ordinal, frame in enumerate(_pyav_frames(path, options.threads)):  # pass 2: keep the samples
        if ordinal > unique[-1]:
            break
        if ordinal not in wanted:
            continue
        rgb = np.rot90(frame.to_ndarray(format="rgb24"), (frame.rotation // 90) % 4)
        size = rgb.shape[:2]
        crops.append(scale_and_crop(np.ascontiguousarray(rgb), options.short_size, options.target_size))
    if len(crops) != len(unique):
        raise BadVideo(
            "decode", "UnstableDecode", f"decoded {len(crops)} of {len(unique)} sampled frames on the second pass"
        )
    return SampledClip(
        frames=_assemble(unique, np.stack(crops), indices),
        indices=indices.astype(np.int32),
        num_frames=num_frames,
        fps=_pyav_fps(path),
        width=int(size[1]),
        height=int(size[0]),
        decoder="pyav",
    )


def _pyav_fps(path: str) -> float:
    container = _open_pyav(path)
    try:
        rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
        return float(rate) if rate else 0.0
    finally:
        container.close()
