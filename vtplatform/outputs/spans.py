"""``spans/``: where each label is in a video (``schema.SPAN_SCHEMA``: ``video_id``, ``class_id``,
``name``, ``start_s``, ``end_s``, ``max_prob``, ``mean_prob``), the runs of windows tagged with
one label merged (``windows.merge_spans``). Made at the end of a run from ``segments/``, for every
video done that has no spans yet, from the labels stored there (never thresholded again)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.outputs import Output
from vtplatform.outputs.compaction import keep_first
from vtplatform.outputs.segments import read_parts
from vtplatform.windows import merge_spans

VIDEOS_PER_PART = 2000


class SpanOutput(Output):
    directory = S.SPANS_DIR
    schema = S.SPAN_SCHEMA
    takes = ()  # made from segments/ at the end of a run
    decides_done = False
    keys = (S.VIDEO_ID, S.CLASS_ID, S.START_S)

    def __init__(self, names: list[str] | None, num_classes: int):
        self.names = names
        self.num_classes = num_classes
        self.made = 0  # videos that got spans in the last finalize

    def finalize(self, fs: pafs.FileSystem, root: str, done: pa.Array) -> None:
        """The spans of every video done that has none yet (``done``: whole in segments/)."""
        keep_first(fs, f"{root}/{self.directory}", self.keys, only=done)
        have = pc.unique(st.read_column(fs, f"{root}/{self.directory}", S.VIDEO_ID).combine_chunks())
        todo = done.filter(pc.invert(pc.is_in(done, value_set=have))) if len(have) else done
        columns = [S.VIDEO_ID, S.WINDOW, S.START_S, S.END_S, S.LABELS, S.LABEL_PROBS]
        self.made = 0
        for offset in range(0, len(todo), VIDEOS_PER_PART):
            ids = todo.slice(offset, VIDEOS_PER_PART)
            table = read_parts(fs, f"{root}/{S.SEGMENTS_DIR}", columns, ids)
            table = table.sort_by([(S.VIDEO_ID, "ascending"), (S.WINDOW, "ascending")])
            spans = []
            for vid, rows in _by_video(table):
                starts, ends, probs, labels, index = _window_labels(rows, self.num_classes)
                spans.append(merge_spans(vid, starts, ends, probs, labels, self.names, index))
            st.write_parquet(
                pa.concat_tables([self.schema.empty_table(), *spans]),
                fs,
                f"{root}/{self.directory}/{st.part_name(ids.to_pylist())}",
            )
            self.made += len(ids)


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
