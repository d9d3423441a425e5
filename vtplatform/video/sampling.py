"""Which frames a video contributes: VideoTag's segment-sampling rules."""

from __future__ import annotations

import numpy as np


def infer_indices(num_frames: int, num_segments: int) -> np.ndarray:
    """VideoTag's inference rule (``kinetics_reader`` in infer mode, seglen 1).

    ``avg = N // seg``; segment i takes frame ``(avg - 1) // 2 + i * avg`` when avg >= 1,
    else frame ``i``; indices wrap modulo N, so a video shorter than ``seg`` repeats frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    avg = num_frames // num_segments
    i = np.arange(num_segments, dtype=np.int64)
    idx = (avg - 1) // 2 + i * avg if avg >= 1 else i
    return idx % num_frames


def segment_indices(
    num_frames: int, num_segments: int, seglen: int = 1, rng: np.random.Generator | None = None
) -> np.ndarray:
    """VideoTag's TSN rule (``kinetics_reader.mp4_loader``/``frames_loader``) for every mode.

    ``avg = N // seg``. With ``rng`` (training) segment i starts at a random offset in
    ``[0, avg - seglen]`` (both ends included, one draw per segment, in order) plus ``i * avg``;
    without it (validation, test, inference) at the centre, ``(avg - 1) // 2 + i * avg``. When
    ``avg < seglen`` the start is ``i * avg``, and when ``avg < 1`` it is ``i``. Each segment then
    takes ``seglen`` consecutive frames; indices wrap modulo N. Returns ``(seg * seglen,)`` int64.
    For seglen 1 and no ``rng`` this equals ``infer_indices``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    avg = num_frames // num_segments
    i = np.arange(num_segments, dtype=np.int64)
    if avg >= seglen:
        offsets = rng.integers(0, avg - seglen, size=num_segments, endpoint=True) if rng is not None else (avg - 1) // 2
        starts = offsets + i * avg
    else:
        starts = i * avg if avg >= 1 else i
    idx = starts[:, None] + np.arange(seglen, dtype=np.int64)[None, :]
    return idx.reshape(-1) % num_frames
