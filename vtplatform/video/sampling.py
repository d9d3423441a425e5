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
