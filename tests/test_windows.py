"""Time-localized tags (``segments``): the windows over a timeline, each window's top-k rows, and
the runs of windows of one label merged into spans."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from vtplatform import schema as S
from vtplatform.outputs.segments import WindowTagOutput
from vtplatform.outputs.spans import SpanOutput
from vtplatform.outputs.timeline import TimelineOutput
from vtplatform.pipeline import finalize_outputs
from vtplatform.windows import NoWindow, Window, chunk_windows, merge_spans, windows


def complete_videos(fs, root):
    return WindowTagOutput(S.SEGMENT_SCHEMA, None).complete(fs, root)


def finalize_segments(fs, root, names, num_classes) -> int:
    """The outputs of tagging with segments, finalized as a run ends; returns the videos that got spans."""
    spans = SpanOutput(names, num_classes)
    outputs = [WindowTagOutput(S.SEGMENT_SCHEMA, names), TimelineOutput(S.timeline_schema(2)), spans]
    finalize_outputs(outputs, fs, root, expected=None)
    return spans.made


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


def test_windows_with_a_stride_longer_than_the_segment_leave_gaps():
    """stride > segment: as the module docstring says, gaps between windows hold frames of no window,
    the windows stop at the last start before the end, and only one that reaches the end ends there."""
    times = np.arange(0.0, 8.5, 0.5)  # 2 frames a second, 0 .. 8
    got = windows(times, 1, 3, 8.2)  # window 2 (6..7) is the last to start before 8.2 and does not reach it
    assert got == [Window(0, 0, 1, slice(0, 2)), Window(1, 3, 4, slice(6, 8)), Window(2, 6, 7, slice(12, 14))]
    covered = {i for w in got for i in range(w.frames.start, w.frames.stop)}
    assert [times[i] for i in sorted(set(range(len(times))) - covered)][:4] == [1.0, 1.5, 2.0, 2.5]
    assert max(times[i] for i in covered) == 6.5  # 7 .. 8 after the last window: in none
    times = np.arange(0.0, 10.0, 0.5)  # 0 .. 9.5
    got = windows(times, 1, 3, 9.5)  # window 3 (9..10) reaches the end: ends there, takes 9 and 9.5
    assert got[-1] == Window(3, 9, 9.5, slice(18, 20))
    assert len(got) == 4


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
    got = spans_of(merge_spans("v", STARTS, ENDS, PROBS, PROBS >= 0.5, ["a", "b", "c"]))
    assert got == [
        ("v", 0, "a", 0.0, 20.0, pytest.approx(0.9), pytest.approx(0.75)),
        ("v", 0, "a", 30.0, 50.0, pytest.approx(0.7), pytest.approx(0.6)),  # a second run: a second span
        ("v", 2, "c", 50.0, 60.0, pytest.approx(0.8), pytest.approx(0.8)),
    ]
    # without label names the names are null; a higher threshold splits and drops runs
    got = spans_of(merge_spans("v", STARTS, ENDS, PROBS, PROBS >= 0.65, None))
    assert got == [
        ("v", 0, None, 0.0, 10.0, pytest.approx(0.9), pytest.approx(0.9)),
        ("v", 0, None, 30.0, 40.0, pytest.approx(0.7), pytest.approx(0.7)),
        ("v", 2, None, 50.0, 60.0, pytest.approx(0.8), pytest.approx(0.8)),
    ]


def test_spans_of_overlapping_windows_and_left_out_windows():
    starts, ends = np.array([0.0, 5.0, 10.0, 15.0]), np.array([10.0, 15.0, 20.0, 25.0])
    probs = np.array([[0.1], [0.8], [0.6], [0.2]])
    assert spans_of(merge_spans("v", starts, ends, probs, probs >= 0.5)) == [
        ("v", 0, None, 5.0, 20.0, pytest.approx(0.8), pytest.approx(0.7))
    ]
    # a window left out (index 2) breaks the run
    starts, ends, index = np.array([0.0, 10.0, 30.0]), np.array([10.0, 20.0, 40.0]), np.array([0, 1, 3])
    got = spans_of(merge_spans("v", starts, ends, np.full((3, 1), 0.9), np.ones((3, 1), bool), ["x"], index=index))
    assert [(g[3], g[4]) for g in got] == [(0.0, 20.0), (30.0, 40.0)]


def test_spans_of_nothing_are_an_empty_table():
    assert merge_spans("v", [], [], np.zeros((0, 5)), np.zeros((0, 5), bool)).num_rows == 0
    assert merge_spans("v", STARTS, ENDS, PROBS, PROBS >= 0.95).schema == S.SPAN_SCHEMA
    with pytest.raises(ValueError):
        merge_spans("v", STARTS[:5], ENDS, PROBS, PROBS >= 0.5)


def chunked(times, segment_s, stride_s, end_s, max_frames):
    frames = ((float(t), i) for i, t in enumerate(times))
    return list(chunk_windows(frames, segment_s, stride_s, lambda: end_s, max_frames))


def test_chunks_hold_whole_windows_and_send_each_frame_once():
    times = np.arange(30.0)  # 1 frame a second; windows of 4 s every 2 s overlap by 2 frames
    chunks = chunked(times, 4, 2, 30.0, max_frames=8)
    assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) > 2
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    for c in chunks:
        for w in c.windows:  # a window's frames are all in its chunk
            assert c.times[w.frames] == [t for t in times if w.start_s <= t < w.end_s]
    new = [t for c in chunks for t in c.times[c.new_from :]]
    assert new == times.tolist()  # every frame once, in order, though chunks overlap
    assert max(len(c.items) for c in chunks) <= 8 + 4  # about max_frames, never the whole video
    assert [w.index for c in chunks for w in c.windows] == [w.index for w in windows(times, 4, 2, 30.0)]


def test_chunks_give_the_same_windows_as_the_whole_timeline():
    rng = np.random.default_rng(0)
    for _ in range(300):
        times = np.unique(np.round(np.cumsum(rng.uniform(0.05, 2.0, int(rng.integers(1, 60)))), 2))
        times -= times[0]
        segment_s, stride_s = (float(x) for x in rng.choice([0.5, 1, 2, 3.5], 2))
        stride_s = min(stride_s, segment_s)
        end_s = float(times[-1] + rng.uniform(0, 2))
        chunks = chunked(times, segment_s, stride_s, end_s, max_frames=int(rng.integers(1, 12)))
        got = [(w.index, w.start_s, w.end_s, c.items[w.frames]) for c in chunks for w in c.windows]
        want = windows(times, segment_s, stride_s, end_s)
        assert got == [(w.index, w.start_s, w.end_s, list(range(w.frames.start, w.frames.stop))) for w in want]
        assert chunks[-1].last and chunks[-1].windows


def test_chunks_of_nothing_and_of_frames_no_window_takes():
    assert chunked([], 2, 2, 0.0, 4) == []
    with pytest.raises(NoWindow):  # windows of 1 s every 10 s; the only frames sit in the gap
        chunked([3.0, 4.0], 1, 10, 30.0, 4)
    with pytest.raises(ValueError):
        chunked([2.0, 1.0], 1, 1, 3.0, 4)


def _segment_part(fs, root, name, video, chunk, last, windows_labels):
    rows = [
        {S.VIDEO_ID: video, S.URI: f"{video}.mp4", S.WINDOW: k, S.START_S: 2.0 * k, S.END_S: 2.0 * k + 2,
         S.CLASS_IDS: [0], S.PROBS: [0.1], S.LABELS: labels, S.LABEL_PROBS: probs, S.CHUNK: chunk, S.LAST_CHUNK: last}
        for k, labels, probs in windows_labels
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=S.SEGMENT_SCHEMA), f"{root}/{S.SEGMENTS_DIR}/{name}")
    times = [t for k, _, _ in windows_labels for t in (2.0 * k, 2.0 * k + 1)]
    timeline = pa.table(
        {S.VIDEO_ID: [video] * len(times), S.T_SECONDS: times, S.FEATURES: S.features_array(np.ones((len(times), 2)), "float16"),
         S.VIDEO_END_S: [2.0 * windows_labels[-1][0] + 2 if last else None] * len(times), S.URI: [f"{video}.mp4"] * len(times)},
        schema=S.timeline_schema(2),
    )  # fmt: skip
    pq.write_table(timeline, f"{root}/{S.TIMELINE_DIR}/{name}")


def test_finalize_keeps_complete_videos_once_and_derives_their_spans(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    (tmp_path / S.SEGMENTS_DIR).mkdir()
    (tmp_path / S.TIMELINE_DIR).mkdir()
    # "a": complete, its first chunk written twice (a video redone after a kill)
    _segment_part(fs, root, "p1.parquet", "a", 0, False, [(0, [1], [0.8]), (1, [1, 2], [0.9, 0.6])])
    _segment_part(fs, root, "p2.parquet", "a", 1, True, [(2, [2], [0.7])])
    _segment_part(fs, root, "p3.parquet", "a", 0, False, [(0, [1], [0.8]), (1, [1, 2], [0.9, 0.6])])
    # "b": its last chunk never came; "c": its first chunk is missing
    _segment_part(fs, root, "p4.parquet", "b", 0, False, [(0, [1], [0.9])])
    _segment_part(fs, root, "p5.parquet", "c", 1, True, [(3, [0], [0.9])])
    assert complete_videos(fs, root).to_pylist() == ["a"]

    assert finalize_segments(fs, root, ["x", "y", "z"], 3) == 1
    segments = pq.read_table(tmp_path / S.SEGMENTS_DIR)
    assert sorted(zip(*segments.select([S.VIDEO_ID, S.WINDOW]).to_pydict().values(), strict=True)) == [
        ("a", 0), ("a", 1), ("a", 2)
    ]  # fmt: skip
    timeline = pq.read_table(tmp_path / S.TIMELINE_DIR)
    assert sorted(timeline.column(S.T_SECONDS).to_pylist()) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert set(timeline.column(S.VIDEO_ID).to_pylist()) == {"a"}
    spans = spans_of(pq.read_table(tmp_path / S.SPANS_DIR))
    assert spans == [
        ("a", 1, "y", 0.0, 4.0, pytest.approx(0.9), pytest.approx(0.85)),
        ("a", 2, "z", 2.0, 6.0, pytest.approx(0.7), pytest.approx(0.65)),
    ]
    assert finalize_segments(fs, root, ["x", "y", "z"], 3) == 0  # nothing new: no spans twice
    assert len(spans_of(pq.read_table(tmp_path / S.SPANS_DIR))) == 2


def test_spans_come_from_the_stored_labels_not_from_a_new_threshold(tmp_path):
    """A window's labels are the truth (chosen when it was tagged): a label stored with a probability
    below the tagging threshold still makes a span, and spans never re-threshold probabilities."""
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    (tmp_path / S.SEGMENTS_DIR).mkdir()
    (tmp_path / S.TIMELINE_DIR).mkdir()
    _segment_part(fs, root, "p1.parquet", "d", 0, True, [(0, [0], [0.2]), (1, [0, 1], [0.3, 0.99])])
    assert finalize_segments(fs, root, None, 2) == 1
    assert spans_of(pq.read_table(tmp_path / S.SPANS_DIR)) == [
        ("d", 0, None, 0.0, 4.0, pytest.approx(0.3), pytest.approx(0.25)),
        ("d", 1, None, 2.0, 4.0, pytest.approx(0.99), pytest.approx(0.99)),
    ]
