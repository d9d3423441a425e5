"""Time-localized tags (``jobs/tag.py --segments``): the windows over a video's timeline frames,
each window's top-k tags (``segments/``), and the windows of one label merged into time spans
(``spans/``). Pure numpy and pyarrow; the frames and their times come from
``video.reader.iter_timeline``, the probabilities from AttentionLSTM.

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
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vtplatform import schema as S
from vtplatform import storage as st

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


# -- the tag job's rows and outputs ------------------------------------------------------------


def video_rows(table: pa.Table) -> pa.Table:
    """A job's rows of whole videos (not timeline chunks)."""
    return table.filter(pc.is_null(table.column(S.CHUNK))) if S.CHUNK in table.column_names else table


def chunk_rows(table: pa.Table) -> pa.Table:
    """A job's timeline chunk rows (``CHUNK`` set)."""
    if S.CHUNK not in table.column_names:
        return table.slice(0, 0)
    return table.filter(pc.is_valid(table.column(S.CHUNK)))


def row_keys(table: pa.Table) -> list[str]:
    """The keys that name a part file of these rows: the video id, and the chunk for chunk rows
    (the chunks of one video land in different write tasks, whose parts must not collide)."""
    ids = table.column(S.VIDEO_ID).to_pylist()
    if S.CHUNK not in table.column_names:
        return ids
    chunks = table.column(S.CHUNK).to_pylist()
    return [v if c is None else f"{v}\n#{c}" for v, c in zip(ids, chunks, strict=True)]


class SegmentOutput:
    """Chunk rows with window tags -> ``segments/``, one SEGMENT_SCHEMA row per window."""

    directory = S.SEGMENTS_DIR

    def __init__(self, schema: pa.Schema, names: list[str] | None):
        self.schema = schema
        self.names = names

    def write(self, good: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        chunks = chunk_rows(good)
        if not chunks.num_rows:
            return
        columns = (S.VIDEO_ID, S.URI, S.CHUNK, S.LAST_CHUNK, S.WIN_INDEX, S.WIN_START, S.WIN_END)
        columns += (S.WIN_CLASS_IDS, S.WIN_PROBS, S.WIN_LABELS, S.WIN_LABEL_PROBS)
        rows = []
        for vid, uri, chunk, last, *per_window in zip(*(chunks.column(c).to_pylist() for c in columns), strict=True):
            for k, start, end, ids, probs, labels, label_probs in zip(*per_window, strict=True):
                rows.append(
                    {
                        S.VIDEO_ID: vid,
                        S.URI: uri,
                        S.WINDOW: k,
                        S.START_S: start,
                        S.END_S: end,
                        S.CLASS_IDS: ids,
                        S.CLASS_NAMES: [self.names[i] for i in ids] if self.names else None,
                        S.PROBS: probs,
                        S.LABELS: labels,
                        S.LABEL_PROBS: label_probs,
                        S.CHUNK: chunk,
                        S.LAST_CHUNK: last,
                    }
                )
        st.write_parquet(pa.Table.from_pylist(rows, schema=self.schema), fs, f"{root}/{self.directory}/{part}")


class TimelineOutput:
    """Chunk rows with features -> ``timeline/``: each timeline frame's TSN features, once."""

    directory = S.TIMELINE_DIR

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        tensor = schema.field(S.FEATURES).type
        self.dim, self.dtype = tensor.shape[0], np.dtype(tensor.value_type.to_pandas_dtype())

    def write(self, good: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        chunks = chunk_rows(good)
        if not chunks.num_rows:
            return
        ids, times, feats = [], [], []
        columns = (S.VIDEO_ID, S.NEW_FROM, S.T_SECONDS, S.FEATURES)
        for vid, new_from, t, raw in zip(*(chunks.column(c).to_pylist() for c in columns), strict=True):
            ids += [vid] * (len(t) - new_from)
            times += t[new_from:]
            feats.append(np.frombuffer(raw, self.dtype).reshape(len(t), self.dim)[new_from:])
        table = pa.table(
            {
                S.VIDEO_ID: pa.array(ids, pa.string()),
                S.T_SECONDS: pa.array(times, pa.float64()),
                S.FEATURES: S.features_array(np.concatenate(feats), self.dtype.name),
            },
            schema=self.schema,
        )
        st.write_parquet(table, fs, f"{root}/{self.directory}/{part}")


class ThumbnailOutput:
    """``thumbnails/<video>.jpg`` from a video's row, ``thumbnails/<video>/<window>.jpg`` from its
    chunk rows (``jobs/report.py`` shows them)."""

    directory = S.THUMBNAILS_DIR

    def write(self, good: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        videos = video_rows(good)
        for vid, jpeg in zip(*(videos.column(c).to_pylist() for c in (S.VIDEO_ID, S.THUMBNAIL)), strict=True):
            if jpeg is not None:
                st.write_bytes(jpeg, fs, f"{root}/{self.directory}/{st.safe_filename(vid)}.jpg")
        chunks = chunk_rows(good)
        for vid, index, jpegs in zip(
            *(chunks.column(c).to_pylist() for c in (S.VIDEO_ID, S.WIN_INDEX, S.WIN_THUMBS)), strict=True
        ):
            for k, jpeg in zip(index, jpegs or [], strict=False):
                if jpeg is not None:
                    st.write_bytes(jpeg, fs, f"{root}/{self.directory}/{st.safe_filename(vid)}/{k:05d}.jpg")


# -- after the pipeline: complete videos, no repeated rows, spans --------------------------------


def complete_videos(fs: pafs.FileSystem, root: str) -> pa.Array:
    """The videos whose windows are all in ``segments/``: the last chunk and every chunk before it."""
    table = _read_parts(fs, f"{root}/{S.SEGMENTS_DIR}", [S.VIDEO_ID, S.CHUNK, S.LAST_CHUNK])
    if table is None or not table.num_rows:
        return pa.array([], pa.string())
    last = table.filter(table.column(S.LAST_CHUNK)).group_by(S.VIDEO_ID).aggregate([(S.CHUNK, "max")])
    seen = table.group_by(S.VIDEO_ID).aggregate([(S.CHUNK, "count_distinct")])
    joined = last.join(seen, S.VIDEO_ID)
    whole = pc.equal(joined.column(f"{S.CHUNK}_count_distinct"), pc.add(joined.column(f"{S.CHUNK}_max"), 1))
    return joined.filter(whole).column(S.VIDEO_ID).combine_chunks()


def finalize_segments(fs: pafs.FileSystem, root: str, names: list[str] | None, num_classes: int) -> int:
    """After a tagging run with segments: drops the window and timeline rows of videos that are
    not complete (a video that failed after some of its chunks were written; a killed run's
    leftovers are redone by the next) and rows written twice (a retried write task, a video
    redone after a kill), then derives the spans of every complete video that has none yet.
    Returns how many videos got spans."""
    complete = complete_videos(fs, root)
    _keep_first(fs, f"{root}/{S.SEGMENTS_DIR}", S.WINDOW, complete)
    _keep_first(fs, f"{root}/{S.TIMELINE_DIR}", S.T_SECONDS, complete)
    have = pc.unique(st.read_column(fs, f"{root}/{S.SPANS_DIR}", S.VIDEO_ID).combine_chunks())
    todo = complete.filter(pc.invert(pc.is_in(complete, value_set=have))) if len(have) else complete
    columns = [S.VIDEO_ID, S.WINDOW, S.START_S, S.END_S, S.LABELS, S.LABEL_PROBS]
    done = 0
    for offset in range(0, len(todo), SPAN_VIDEOS_PER_PART):
        ids = todo.slice(offset, SPAN_VIDEOS_PER_PART)
        table = _read_parts(fs, f"{root}/{S.SEGMENTS_DIR}", columns, ids)
        table = table.sort_by([(S.VIDEO_ID, "ascending"), (S.WINDOW, "ascending")])
        spans = []
        for vid, rows in _by_video(table):
            starts, ends, probs, labels, index = _window_labels(rows, num_classes)
            spans.append(merge_spans(vid, starts, ends, probs, labels, names, index))
        st.write_parquet(
            pa.concat_tables([pa.Table.from_pylist([], schema=S.SPAN_SCHEMA), *spans]),
            fs,
            f"{root}/{S.SPANS_DIR}/{st.part_name(ids.to_pylist())}",
        )
        done += len(ids)
    return done


SPAN_VIDEOS_PER_PART = 2000


def _window_labels(
    rows: pa.Table, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, probs, labels, index) of one video's windows: ``labels`` the stored labels as
    a dense (windows, classes) bool matrix, ``probs`` their probabilities (0 elsewhere)."""
    probs = np.zeros((rows.num_rows, num_classes), np.float32)
    labels = np.zeros((rows.num_rows, num_classes), bool)
    for j, (ids, p) in enumerate(zip(*(rows.column(c).to_pylist() for c in (S.LABELS, S.LABEL_PROBS)), strict=True)):
        probs[j, ids] = p
        labels[j, ids] = True
    starts, ends = (rows.column(c).to_numpy() for c in (S.START_S, S.END_S))
    return starts, ends, probs, labels, rows.column(S.WINDOW).to_numpy()


def _by_video(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    if not table.num_rows:
        return
    ids = table.column(S.VIDEO_ID).to_numpy(zero_copy_only=False)
    bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])
    for lo, hi in itertools.pairwise(bounds):
        yield str(ids[lo]), table.slice(lo, hi - lo)


def _read_parts(
    fs: pafs.FileSystem, directory: str, columns: list[str], ids: pa.Array | None = None
) -> pa.Table | None:
    parts = st.list_files(fs, directory, ".parquet")
    if not parts:
        return None
    tables = []
    for path in parts:
        table = pq.read_table(path, filesystem=fs, columns=columns)
        tables.append(table if ids is None else table.filter(pc.is_in(table.column(S.VIDEO_ID), value_set=ids)))
    return pa.concat_tables(tables)


def _keep_first(fs: pafs.FileSystem, directory: str, key: str, videos: pa.Array) -> None:
    """Rewrites the parts under ``directory`` so that only rows of ``videos`` remain, each
    ``(video_id, key)`` once (its first row, parts in name order)."""
    parts = st.list_files(fs, directory, ".parquet")
    if not parts:
        return
    keys = [pq.read_table(p, filesystem=fs, columns=[S.VIDEO_ID, key]) for p in parts]
    sizes = np.array([k.num_rows for k in keys])
    table = pa.concat_tables(keys).combine_chunks()
    table = table.append_column("row", pa.array(np.arange(table.num_rows)))
    order = table.take(pc.sort_indices(table, [(S.VIDEO_ID, "ascending"), (key, "ascending"), ("row", "ascending")]))
    vid, k = order.column(S.VIDEO_ID).to_numpy(zero_copy_only=False), order.column(key).to_numpy()
    first = np.r_[True, (vid[1:] != vid[:-1]) | (k[1:] != k[:-1])][: len(vid)]
    wanted = first & pc.is_in(order.column(S.VIDEO_ID), value_set=videos).to_numpy(zero_copy_only=False)
    keep = np.zeros(table.num_rows, bool)
    keep[order.column("row").to_numpy()[wanted]] = True
    offsets = np.r_[0, np.cumsum(sizes)]
    for i, path in enumerate(parts):
        mask = keep[offsets[i] : offsets[i + 1]]
        if mask.all():
            continue
        if mask.any():
            part = pq.read_table(path, filesystem=fs)
            st.write_parquet(part.filter(pa.array(mask)).replace_schema_metadata(part.schema.metadata), fs, path)
        else:
            fs.delete_file(path)
