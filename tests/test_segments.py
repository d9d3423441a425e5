"""Time-localized tags (``segments``): the windows over a timeline, each window's top-k rows, and
the runs of windows of one label merged into spans."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vtplatform import schema as S
from vtplatform.segments import Window, merge_spans, segment_rows, windows


def spans_of(table: pa.Table) -> list[tuple]:
    assert table.schema == S.SPAN_SCHEMA
    cols = (S.VIDEO_ID, S.CLASS_ID, S.NAME, S.START_S, S.END_S, S.MAX_PROB, S.MEAN_PROB)
    return [tuple(row[c] for c in cols) for row in table.to_pylist()]


def test_windows_with_stride_equal_to_the_segment_tile_the_video():
    times = np.arange(25.0)  # 1 frame a second, 0 .. 24
    assert windows(times, 10, 10, 25.0) == [
        Window(0, 0, 10, slice(0, 10)),
        Window(1, 10, 20, slice(10, 20)),
        Window(2, 20, 25.0, slice(20, 25)),  # the last one is shorter
    ]


def test_overlapping_windows_stop_at_the_first_that_reaches_the_end():
    times = np.arange(25.0)
    assert windows(times, 10, 5, 25.0) == [
        Window(0, 0, 10, slice(0, 10)),
        Window(1, 5, 15, slice(5, 15)),
        Window(2, 10, 20, slice(10, 20)),
        Window(3, 15, 25.0, slice(15, 25)),  # [20, 25) would lie inside it: no window 4
    ]
    got = windows(np.arange(23.0), 10, 4, 23.0)
    assert [(w.index, w.start_s, w.end_s) for w in got] == [
        (0, 0, 10),
        (1, 4, 14),
        (2, 8, 18),
        (3, 12, 22),
        (4, 16, 23),
    ]
    assert got[-1].frames == slice(16, 23)


def test_a_video_shorter_than_a_window_has_one_window():
    assert windows(np.array([0.0, 1.0, 2.0, 3.0]), 10, 10, 3.6) == [Window(0, 0, 3.6, slice(0, 4))]
    assert windows(np.array([0.0]), 10, 5, 0.0) == [Window(0, 0, 0.0, slice(0, 1))]  # one frame, no duration


def test_the_last_window_takes_the_frames_at_the_end():
    times = np.arange(11.0)  # a frame exactly at the end (10 s)
    assert windows(times, 10, 10, 10.0) == [Window(0, 0, 10.0, slice(0, 11))]
    # an unknown (0) or short duration: the last frame's time is the end
    assert windows(times, 4, 4, 0.0)[-1] == Window(2, 8, 10.0, slice(8, 11))


def test_windows_without_frames_are_left_out_keeping_their_indices():
    times = np.array([0.0, 0.1, 0.5, 2.0, 25.0, 26.0])  # a variable-frame-rate gap of 23 s
    got = windows(times, 10, 10, 27.0)
    assert got == [Window(0, 0, 10, slice(0, 4)), Window(2, 20, 27.0, slice(4, 6))]
    # with a stride longer than the segment, the frames between windows are in none
    got = windows(np.arange(10.0), 2, 5, 10.0)
    assert got == [Window(0, 0, 2, slice(0, 2)), Window(1, 5, 7, slice(5, 7))]


def test_windows_reject_bad_arguments():
    with pytest.raises(ValueError, match="> 0"):
        windows(np.arange(3.0), 0, 10, 3.0)
    with pytest.raises(ValueError, match="> 0"):
        windows(np.arange(3.0), 10, -1, 3.0)
    with pytest.raises(ValueError, match="ascending"):
        windows(np.array([0.0, 2.0, 1.0]), 10, 10, 3.0)


PROBS = np.array(
    [  # 6 windows x 3 classes
        [0.9, 0.1, 0.1],
        [0.6, 0.49999, 0.1],
        [0.2, 0.3, 0.1],
        [0.7, 0.2, 0.1],
        [0.5, 0.0, 0.1],  # exactly the threshold: in
        [0.1, 0.0, 0.8],
    ],
    np.float32,
)
STARTS = np.arange(6) * 10.0
ENDS = STARTS + 10.0


def test_spans_merge_runs_of_windows_above_the_threshold():
    got = spans_of(merge_spans("v", STARTS, ENDS, PROBS, 0.5, ["a", "b", "c"]))
    assert got == [
        ("v", 0, "a", 0.0, 20.0, pytest.approx(0.9), pytest.approx(0.75)),
        ("v", 0, "a", 30.0, 50.0, pytest.approx(0.7), pytest.approx(0.6)),  # a second run: a second span
        ("v", 2, "c", 50.0, 60.0, pytest.approx(0.8), pytest.approx(0.8)),
    ]
    # without label names the names are null; a higher threshold splits and drops runs
    got = spans_of(merge_spans("v", STARTS, ENDS, PROBS, 0.65, None))
    assert got == [
        ("v", 0, None, 0.0, 10.0, pytest.approx(0.9), pytest.approx(0.9)),
        ("v", 0, None, 30.0, 40.0, pytest.approx(0.7), pytest.approx(0.7)),
        ("v", 2, None, 50.0, 60.0, pytest.approx(0.8), pytest.approx(0.8)),
    ]


def test_spans_of_overlapping_windows_and_left_out_windows():
    starts, ends = np.array([0.0, 5.0, 10.0, 15.0]), np.array([10.0, 15.0, 20.0, 25.0])
    probs = np.array([[0.1], [0.8], [0.6], [0.2]])
    assert spans_of(merge_spans("v", starts, ends, probs, 0.5)) == [
        ("v", 0, None, 5.0, 20.0, pytest.approx(0.8), pytest.approx(0.7))
    ]
    # a window left out (index 2) breaks the run
    starts, ends, index = np.array([0.0, 10.0, 30.0]), np.array([10.0, 20.0, 40.0]), np.array([0, 1, 3])
    got = spans_of(merge_spans("v", starts, ends, np.full((3, 1), 0.9), 0.5, ["x"], index=index))
    assert [(g[3], g[4]) for g in got] == [(0.0, 20.0), (30.0, 40.0)]


def test_spans_of_nothing_are_an_empty_table():
    assert merge_spans("v", [], [], np.zeros((0, 5)), 0.5).num_rows == 0
    assert merge_spans("v", STARTS, ENDS, PROBS, 0.95).schema == S.SPAN_SCHEMA
    with pytest.raises(ValueError):
        merge_spans("v", STARTS[:5], ENDS, PROBS, 0.5)


def test_segment_rows_hold_each_windows_top_k():
    wins = [Window(0, 0.0, 10.0, slice(0, 10)), Window(2, 20.0, 25.0, slice(10, 15))]
    probs = np.array([[0.1, 0.7, 0.7, 0.2], [0.9, 0.05, 0.3, 0.6]])
    table = segment_rows("v", "s3://b/v.mp4", wins, probs, 2, ["a", "b", "c", "d"])
    assert table.schema == S.SEGMENT_SCHEMA
    rows = table.to_pylist()
    assert [(r[S.WINDOW], r[S.START_S], r[S.END_S]) for r in rows] == [(0, 0.0, 10.0), (2, 20.0, 25.0)]
    assert [r[S.CLASS_IDS] for r in rows] == [[1, 2], [0, 3]]  # a tie goes to the lower class id
    assert [r[S.CLASS_NAMES] for r in rows] == [["b", "c"], ["a", "d"]]
    assert rows[1][S.PROBS] == pytest.approx([0.9, 0.6]) and rows[0][S.URI] == "s3://b/v.mp4"
    rows = segment_rows("v", None, wins, probs, 10, None).to_pylist()
    assert rows[0][S.CLASS_NAMES] is None and rows[0][S.CLASS_IDS] == [1, 2, 3, 0]
    assert segment_rows("v", None, [], np.zeros((0, 4)), 2).num_rows == 0
