"""Decoding chosen frames (any indices, any order, repeats allowed) or every frame of a video.

The same decoder choice as ``decode.sample_clip``: decord first, PyAV for files decord rejects.
Each frame goes through ``per_frame`` (a scale, or a scale and a crop) as soon as it is decoded,
so at most ``chunk_frames`` full-size frames are held at a time. Training, evaluation and the
frame cache all read frames through this module, so a cached frame is the same array the video
path would have produced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from vtplatform.video.decode import (
    BadVideo,
    _first_line,
    _is_decord_error,
    check_readable,
    display_rgb,
    open_pyav,
    probe,
    pyav_count,
    pyav_fps,
    pyav_frames,
)

log = logging.getLogger(__name__)

FrameFn = Callable[[np.ndarray], np.ndarray]
ChooseFn = Callable[[int], np.ndarray]


@dataclass(frozen=True)
class ReadOptions:
    decoder: str = "auto"  # auto | decord | pyav
    threads: int = 1
    chunk_frames: int = 8


@dataclass
class Frames:
    frames: np.ndarray  # (K, h, w, 3) uint8: per_frame(decoded frame) for each chosen index
    indices: np.ndarray  # (K,) int64, into the decoded frames
    num_frames: int
    fps: float
    width: int  # decoded frame size, as displayed
    height: int
    decoder: str


def read_frames(path: str, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions) -> Frames:
    """Decodes the frames ``choose(num_frames)`` picks from the local file ``path``.

    Raises ``BadVideo`` for anything wrong with the file; other exceptions are our bugs.
    """
    check_readable(path)
    if options.decoder == "pyav":
        return _read_pyav(path, choose, per_frame, options)
    if options.decoder == "auto":
        info = probe(path)
        if info is not None and not info.decord_exact:  # where decord's seeking returns wrong frames
            return _read_pyav(path, choose, per_frame, options)
    try:
        return _read_decord(path, choose, per_frame, options)
    except BadVideo:
        raise
    except Exception as exc:
        if options.decoder == "decord" or not _is_decord_error(exc):
            if _is_decord_error(exc):
                raise BadVideo("decode", "DecodeError", f"decord: {_first_line(exc)}") from exc
            raise
        log.info("decord rejected %s (%s); trying PyAV", path, _first_line(exc))
        try:
            return _read_pyav(path, choose, per_frame, options)
        except BadVideo as bad:
            bad.message = f"{bad.message} (decord: {_first_line(exc)})"
            raise


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise BadVideo("decode", "InconsistentFrameSize", f"frames of different sizes after scaling: {sorted(shapes)}")
    return np.stack(frames)


def _check_indices(indices: np.ndarray, num_frames: int) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0 or indices.min() < 0 or indices.max() >= num_frames:
        raise ValueError(f"chosen frame indices must lie in [0, {num_frames}), got {indices.tolist()[:10]}")
    return indices


def _read_decord(path: str, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions) -> Frames:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=options.threads)
    num_frames = len(reader)
    if num_frames < 1:
        raise BadVideo("decode", "NoFrames", "the video stream has no frames")
    indices = _check_indices(choose(num_frames), num_frames)
    unique = np.unique(indices)
    out, size = [], (0, 0)
    for start in range(0, len(unique), options.chunk_frames):
        batch = reader.get_batch(unique[start : start + options.chunk_frames].tolist()).asnumpy()
        size = batch.shape[1:3]
        out.extend(per_frame(f) for f in batch)
        del batch
    frames = _stack(out)[np.searchsorted(unique, indices)]
    return Frames(frames, indices, num_frames, float(reader.get_avg_fps()), int(size[1]), int(size[0]), "decord")


def _read_pyav(path: str, choose: ChooseFn, per_frame: FrameFn, options: ReadOptions) -> Frames:
    num_frames = pyav_count(path, options.threads)  # pass 1: count, keep nothing
    indices = _check_indices(choose(num_frames), num_frames)
    unique = np.unique(indices)
    wanted = set(unique.tolist())
    out, size = [], (0, 0)
    for ordinal, frame in enumerate(pyav_frames(path, options.threads)):  # pass 2: keep the chosen ones
        if ordinal > unique[-1]:
            break
        if ordinal in wanted:
            rgb = display_rgb(frame)
            size = rgb.shape[:2]
            out.append(per_frame(rgb))
    if len(out) != len(unique):
        raise BadVideo(
            "decode", "UnstableDecode", f"decoded {len(out)} of {len(unique)} chosen frames on the second pass"
        )
    frames = _stack(out)[np.searchsorted(unique, indices)]
    return Frames(frames, indices, num_frames, pyav_fps(path), int(size[1]), int(size[0]), "pyav")


@dataclass
class StreamInfo:
    num_frames: int  # known up front with decord; -1 with PyAV until the stream ends
    fps: float
    decoder: str


def iter_all_frames(path: str, per_frame: FrameFn, options: ReadOptions) -> tuple[StreamInfo, Iterator[np.ndarray]]:
    """Every frame of ``path`` in order, through ``per_frame``, one chunk of full-size frames at a time.

    The decoder is chosen when the file is opened (decord, else PyAV); a decord failure in the
    middle of the stream raises ``BadVideo`` rather than switching decoders, since the frames
    already yielded would otherwise be repeated.
    """
    check_readable(path)
    if options.decoder != "pyav":
        try:
            return _stream_decord(path, per_frame, options)
        except Exception as exc:
            if options.decoder == "decord" or not _is_decord_error(exc):
                if _is_decord_error(exc):
                    raise BadVideo("decode", "DecodeError", f"decord: {_first_line(exc)}") from exc
                raise
            log.info("decord rejected %s (%s); streaming it with PyAV", path, _first_line(exc))
    return _stream_pyav(path, per_frame, options)


def _stream_decord(path: str, per_frame: FrameFn, options: ReadOptions) -> tuple[StreamInfo, Iterator[np.ndarray]]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=options.threads)
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


def _stream_pyav(path: str, per_frame: FrameFn, options: ReadOptions) -> tuple[StreamInfo, Iterator[np.ndarray]]:
    import av

    container = open_pyav(path)
    container.close()
    fps = pyav_fps(path)

    def frames() -> Iterator[np.ndarray]:
        try:
            for frame in pyav_frames(path, options.threads):
                yield per_frame(display_rgb(frame))
        except av.error.FFmpegError as exc:
            raise BadVideo("decode", "DecodeError", f"PyAV: {exc}") from exc

    return StreamInfo(-1, fps, "pyav"), frames()
