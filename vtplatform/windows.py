"""Time windows (``jobs/tag.py --segments``): the windows over a video's timeline frames
(``windows``), the same windows streamed in chunks (``chunk_windows``), and the windows of one
label merged into time spans (``merge_spans``). Pure numpy and pyarrow; the frames and their times
come from ``video.reader.iter_timeline``, the labels from AttentionLSTM; the tables they make are
``outputs.segments`` (each window's tags) and ``outputs.spans``.

Windows: window ``k`` starts at ``k * stride_s`` and nominally covers ``[start, start +
segment_s)`` of the timeline; the video ends at ``end = max(duration_s, last frame time)``.
Windows are made for k = 0, 1, ... and stop at the first one that reaches the end (its nominal
end at or after ``end``), or at the last one that starts before the end, whichever comes first.
A window that reaches the end ends there (so it may be shorter) and takes every frame from its
start on, the frames at ``end`` included. Every other window ends at its nominal end.

* ``stride_s <= segment_s`` (tiling or overlapping): each window either reaches the end or the
  next starts inside it, so the last window always reaches the end and every frame is in a window.
* ``stride_s > segment_s`` (gaps): the frames between one window's nominal end and the next
  window's start are in no window, and so are those after the last window when it starts before
  the end without reaching it.

A video shorter than one window has one window covering it. A window without a timeline frame
cannot be tagged and is left out (a variable-frame-rate file can have gaps longer than a window),
keeping the window index ``k`` of the others.

Spans: for each class, a maximal run of consecutive windows (window indices ``k, k+1, ...``:
with overlapping windows, each next one; a left-out window breaks the run) tagged with the class
(its stored ``labels``: at or above the threshold when the window was tagged) is one span ``[first window's start, last window's end]``, with the
maximum and the mean of the run's probabilities. Spans come sorted by start, then class id.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa

from vtplatform import schema as S

T = TypeVar("T")


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


class NoWindow(ValueError):
    """Timeline frames that no window takes."""


class Chunk(NamedTuple, Generic[T]):
    """A run of timeline frames holding whole windows (``chunk_windows``)."""

    index: int  # its place among its video's chunks, from 0
    last: bool
    new_from: int  # items[new_from:] are in no earlier chunk (with overlapping windows the first few can be)
    times: list[float]
    items: list[T]
    windows: list[Window]  # their frames are items[w.frames]


def chunk_windows(
    frames: Iterable[tuple[float, T]],
    segment_s: float,
    stride_s: float,
    end_s: Callable[[], float],
    max_frames: int,
) -> Iterator[Chunk[T]]:
    """Streams a video's timeline ``(t_seconds, item)`` frames (ascending) into chunks that each
    hold whole windows (the windows of ``windows``, the same ones), about ``max_frames`` frames a
    chunk (more when one window alone has more), holding at most about one chunk of frames at a
    time. ``end_s()``, asked once the frames are exhausted, is the video's end (``duration_s`` of
    ``windows``). The last chunk (``last``) always holds at least one window; a video without
    frames has no chunk.

    Window ``k`` is final as soon as a frame later than both its nominal end and the next
    window's start arrives: then it is not the video's last window, and all its frames are in.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    windows(np.zeros(0), segment_s, stride_s, 0.0)  # checks segment_s and stride_s
    times: list[float] = []  # buffered frames; times[0] is frame number ``base`` of the video
    items: list[T] = []
    base = 0
    emitted_to = 0  # frames before this number went out in an earlier chunk
    pending: list[Window] = []  # final windows not yet sent, their slices in frame numbers
    k = 0  # the next window to make final
    chunk = 0

    def emit(wins: list[Window], last: bool) -> Chunk[T]:
        nonlocal emitted_to, chunk
        lo, hi = wins[0].frames.start, max(w.frames.stop for w in wins)
        out = Chunk(
            chunk,
            last,
            max(emitted_to - lo, 0),
            times[lo - base : hi - base],
            items[lo - base : hi - base],
            [Window(w.index, w.start_s, w.end_s, slice(w.frames.start - lo, w.frames.stop - lo)) for w in wins],
        )
        emitted_to, chunk = max(emitted_to, hi), chunk + 1
        return out

    for t, item in frames:
        if times and t < times[-1]:
            raise ValueError(f"timeline frames out of order: {t} after {times[-1]}")
        times.append(t)
        items.append(item)
        while t > max(k * stride_s + segment_s, (k + 1) * stride_s):
            start = k * stride_s
            lo = base + bisect.bisect_left(times, start)
            hi = base + bisect.bisect_left(times, start + segment_s)
            if hi > lo:
                pending.append(Window(k, start, start + segment_s, slice(lo, hi)))
            k += 1
        # Send all but the newest final window once they span max_frames: the newest stays for the
        # last chunk, which so always has a window.
        if len(pending) > 1 and max(w.frames.stop for w in pending[:-1]) - pending[0].frames.start >= max_frames:
            yield emit(pending[:-1], last=False)
            pending = pending[-1:]
            drop = pending[0].frames.start - base
            del times[:drop], items[:drop]
            base += drop
    if not times:
        return
    end = max(float(end_s()), times[-1])
    rest = [
        Window(w.index, w.start_s, w.end_s, slice(base + w.frames.start, base + w.frames.stop))
        for w in windows(np.asarray(times), segment_s, stride_s, end)
        if w.index >= k
    ]
    if pending or rest:
        yield emit(pending + rest, last=True)
    else:  # frames that no window takes (stride_s > segment_s, frames in the gaps only)
        raise NoWindow("no window holds a timeline frame")


def merge_spans(
    video_id: str,
    starts: np.ndarray,
    ends: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    names: list[str] | None = None,
    index: np.ndarray | None = None,
) -> pa.Table:
    """SPAN_SCHEMA rows of one video from its windows' ``labels`` (n_windows, num_classes) bools:
    the classes each window was tagged with (at or above the threshold when it was tagged; the
    stored ``labels`` of ``segments/``, never thresholded again here) and their ``probs`` (same
    shape). The windows come in time order with their ``starts`` and ``ends`` (seconds) and grid
    ``index`` (window ``k``; default 0..n-1, i.e. no window left out). ``name`` is null without
    ``names``."""
    probs = np.asarray(probs)
    above = np.asarray(labels, bool)
    n = probs.shape[0]
    starts, ends = np.asarray(starts, np.float64), np.asarray(ends, np.float64)
    index = np.arange(n) if index is None else np.asarray(index, np.int64)
    if probs.ndim != 2 or above.shape != probs.shape or not (starts.shape == ends.shape == index.shape == (n,)):
        raise ValueError(
            f"probs {probs.shape}, labels {above.shape}, starts {starts.shape}, ends {ends.shape}, index {index.shape}"
        )
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
