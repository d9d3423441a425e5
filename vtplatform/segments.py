"""Time-localized tags (``jobs/tag.py --segments``): the windows over a video's timeline frames,
each window's top-k tags (``segments/``), and the windows of one label merged into time spans
(``spans/``). Pure numpy and pyarrow; the frames and their times come from
``video.reader.iter_timeline``, the probabilities from AttentionLSTM.

Windows: window ``k`` starts at ``k * stride_s`` and nominally covers ``[start, start +
segment_s)`` of the timeline. The windows run from 0 until one reaches the end of the video
(``max(duration_s, last frame time)``); that last window ends at the video's end (so it may be
shorter) and also takes the frames at or after its nominal end, so that every frame is in a
window when ``stride_s <= segment_s``. A video shorter than one window has one window covering
it. A window without a timeline frame cannot be tagged and is left out (a variable-frame-rate
file can have gaps longer than a window), keeping the window index ``k`` of the others.

Spans: for each class, a maximal run of consecutive windows (window indices ``k, k+1, ...``:
with overlapping windows, each next one; a left-out window breaks the run) whose probability is
at or above the threshold is one span ``[first window's start, last window's end]``, with the
maximum and the mean of the run's probabilities. Spans come sorted by start, then class id.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa

from vtplatform import schema as S
from vtplatform.labels import top_k_indices


class Window(NamedTuple):
    index: int  # k: the window's place in the grid of starts (the WINDOW column)
    start_s: float
    end_s: float
    frames: slice  # its timeline frames: times[frames]


def windows(times: np.ndarray, segment_s: float, stride_s: float, duration_s: float) -> list[Window]:
    """The windows over timeline frames at ``times`` (seconds, ascending) of a video of
    ``duration_s`` seconds (0 when unknown: the last frame's time is used), as the module says."""
    if not segment_s > 0 or not stride_s > 0:
        raise ValueError(f"segment_s and stride_s must be > 0, got {segment_s} and {stride_s}")
    times = np.asarray(times, dtype=np.float64)
    if times.size and np.any(np.diff(times) < 0):
        raise ValueError("times must be in ascending order")
    end = max(float(duration_s), float(times[-1]) if times.size else 0.0)
    out = []
    k = 0
    while True:
        start = float(k * stride_s)
        nominal_end = start + segment_s
        reaches_end = nominal_end >= end
        lo = int(np.searchsorted(times, start, "left"))
        hi = times.size if reaches_end else int(np.searchsorted(times, nominal_end, "left"))
        if hi > lo:
            out.append(Window(k, start, min(nominal_end, end), slice(lo, hi)))
        if reaches_end or (k + 1) * stride_s >= end:
            return out
        k += 1


def merge_spans(
    video_id: str,
    starts: np.ndarray,
    ends: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    names: list[str] | None = None,
    index: np.ndarray | None = None,
) -> pa.Table:
    """SPAN_SCHEMA rows of one video from its windows' ``probs`` (n_windows, num_classes), the
    windows in time order with their ``starts`` and ``ends`` (seconds) and grid ``index`` (window
    ``k``; default 0..n-1, i.e. no window left out). ``name`` is null without ``names``."""
    probs = np.asarray(probs)
    n = probs.shape[0]
    starts, ends = np.asarray(starts, np.float64), np.asarray(ends, np.float64)
    index = np.arange(n) if index is None else np.asarray(index, np.int64)
    if probs.ndim != 2 or not (starts.shape == ends.shape == index.shape == (n,)):
        raise ValueError(f"probs {probs.shape}, starts {starts.shape}, ends {ends.shape}, index {index.shape}")
    above = probs >= threshold
    # A run starts where the previous window is below, or not the previous grid index.
    follows = np.zeros(n, bool)
    follows[1:] = np.diff(index) == 1
    rows = []
    for class_id in np.flatnonzero(above.any(axis=0)):
        on = above[:, class_id]
        continues = np.concatenate([[False], on[:-1]]) & follows
        members_all = np.flatnonzero(on)
        for members in np.split(members_all, np.flatnonzero(~continues[members_all])[1:]):
            p = probs[members, class_id].astype(np.float64)
            rows.append(
                {
                    S.VIDEO_ID: video_id,
                    S.CLASS_ID: int(class_id),
                    S.NAME: names[class_id] if names is not None else None,
                    S.START_S: float(starts[members[0]]),
                    S.END_S: float(ends[members[-1]]),
                    S.MAX_PROB: float(p.max()),
                    S.MEAN_PROB: float(p.mean()),
                }
            )
    rows.sort(key=lambda r: (r[S.START_S], r[S.CLASS_ID]))
    return pa.Table.from_pylist(rows, schema=S.SPAN_SCHEMA)


def segment_rows(
    video_id: str,
    uri: str | None,
    wins: list[Window],
    probs: np.ndarray,
    top_k: int,
    names: list[str] | None = None,
) -> pa.Table:
    """SEGMENT_SCHEMA rows of one video: each window's ``top_k`` classes, best first (ties to the
    lower class id), from ``probs`` (n_windows, num_classes) in the order of ``wins``;
    ``class_names`` is null without ``names``."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] != len(wins):
        raise ValueError(f"probs {probs.shape} for {len(wins)} windows")
    top = top_k_indices(probs, top_k)
    rows = [
        {
            S.VIDEO_ID: video_id,
            S.URI: uri,
            S.WINDOW: w.index,
            S.START_S: w.start_s,
            S.END_S: w.end_s,
            S.CLASS_IDS: ids.tolist(),
            S.CLASS_NAMES: [names[i] for i in ids] if names is not None else None,
            S.PROBS: probs[j, ids].astype(np.float32).tolist(),
        }
        for j, (w, ids) in enumerate(zip(wins, top, strict=True))
    ]
    return pa.Table.from_pylist(rows, schema=S.SEGMENT_SCHEMA)
