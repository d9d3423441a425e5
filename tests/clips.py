"""Generated test videos, written with PyAV (which bundles FFmpeg and its encoders).

``write_indexed_clip`` encodes each frame's ordinal in its pixels (losslessly), so a test can
read back which frames a decoder returned: ``frame_ordinal(rgb)`` inverts it.
"""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def indexed_frame(i: int, width: int, height: int) -> np.ndarray:
    """Grey frame: left half 4 * (i % 64), right half 16 * (i // 64) (ordinals up to 1023).

    Steps of 4 and 16 grey levels survive limited-range YUV 4:2:0 and bilinear resizing."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:, : width // 2] = 4 * (i % 64)
    frame[:, width // 2 :] = 16 * ((i // 64) % 16)
    return frame


def frame_ordinal(rgb: np.ndarray) -> int:
    h, w = rgb.shape[:2]
    low = float(rgb[h // 4 : 3 * h // 4, w // 8 : 3 * w // 8].mean())
    high = float(rgb[h // 4 : 3 * h // 4, 5 * w // 8 : 7 * w // 8].mean())
    return round(low / 4) + 64 * round(high / 16)


PIX_FMTS = {"ffv1": "yuv444p", "mjpeg": "yuvj420p", "prores": "yuv422p10le"}


def write_indexed_clip(
    path: Path,
    num_frames: int,
    width: int = 320,
    height: int = 240,
    fps: int = 25,
    codec: str = "libx264",
    **options: str,
) -> Path:
    """A clip whose frame i is ``indexed_frame(i)``: lossless for libx264 (qp 0) and ffv1, and at
    a high bit rate for the other encoders, so that ``frame_ordinal`` reads every frame back."""
    opts = {"qp": "0", "preset": "ultrafast"} if codec == "libx264" else {"b": "20M"}
    opts.update(options)
    pix_fmt = PIX_FMTS.get(codec, "yuv420p")
    return write_clip(
        path, (indexed_frame(i, width, height) for i in range(num_frames)), width, height, fps, codec, pix_fmt, opts
    )


def write_clip(
    path: Path,
    frames,
    width: int,
    height: int,
    fps: int = 25,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    container_options = {"movflags": "faststart"} if path.suffix in (".mp4", ".mov") else {}
    with scheduling_kept(), av.open(str(path), "w", options=container_options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options or {}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@contextlib.contextmanager
def scheduling_kept():
    """Puts the calling thread's scheduling back as it was. SVT-AV1 (``libsvtav1``), run as root,
    switches the thread that opens the encoder to real-time scheduling (SCHED_FIFO, priority 99),
    and every process started from it afterwards inherits that: a test session's Ray, its job
    subprocesses. Busy real-time workers then starve the rest (the GCS stopped answering and
    training waited forever for data tasks)."""
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if (os.sched_getscheduler(0), os.sched_getparam(0)) != (policy, param):
            os.sched_setscheduler(0, policy, param)


def write_noise_clip(
    path: Path,
    num_frames: int,
    width: int = 320,
    height: int = 240,
    fps: int = 25,
    seed: int = 0,
    codec: str = "libx264",
) -> Path:
    """Smoothly moving colour noise: realistic bit rates for size and memory tests."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((8, 8, 1), np.uint8))

    def frames():
        for i in range(num_frames):
            yield np.roll(big, shift=(i * 3) % width, axis=1)

    return write_clip(
        path, frames(), width, height, fps, codec, options={"preset": "ultrafast"} if codec == "libx264" else {}
    )


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=44100)
        samples = int(44100 * seconds)
        t = np.arange(samples) / 44100.0
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        frame_size = 1024
        for start in range(0, samples, frame_size):
            chunk = tone[start : start + frame_size].reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = 44100
            frame.pts = start
            frame.time_base = Fraction(1, 44100)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)
