"""The decode stage's rows (``stages.decode.decode_videos``, no Ray needed without a ledger): with a
timeline the samples are those of a run without one, from one decode, and every row splits its
busy time into decode and preprocess."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import EXAMPLES
from tests.video.crop_digests import DIGESTS, one_pass_digests
from vtplatform import schema as S
from vtplatform.config import StorageSection
from vtplatform.stages.decode import DecodeOptions, TimelineOptions, decode_videos
from vtplatform.video.reader import ReadOptions

CLIPS = ["mmaction2_demo.mp4", "mmaction2_test.avi", "paddlevideo_example.avi"]  # decord, PyAV's pass, decord


def _rows(timeline: TimelineOptions | None) -> pa.Table:
    batch = pa.table({S.VIDEO_ID: CLIPS, S.URI: [str(EXAMPLES / c) for c in CLIPS]})
    options = DecodeOptions(300, 256, 224, ReadOptions(), timeline)
    return pa.concat_tables(decode_videos(batch, options, StorageSection()))


def test_one_decode_keeps_the_samples_and_splits_the_busy_time():
    alone = _rows(None)
    both = _rows(TimelineOptions(1.0, 4.0, 4.0))
    videos = both.filter(both.column(S.CHUNK).is_null())
    chunks = both.filter(both.column(S.CHUNK).is_valid())
    assert alone.column(S.VIDEO_ID).to_pylist() == videos.column(S.VIDEO_ID).to_pylist() == CLIPS
    for col in (S.FRAMES, S.FRAME_INDICES, S.NUM_FRAMES, S.DECODER):
        assert alone.column(col).to_pylist() == videos.column(col).to_pylist(), col
    assert set(chunks.column(S.VIDEO_ID).to_pylist()) == set(CLIPS)
    for table in (alone, both):
        decode = np.asarray(table.column(S.DECODE_SECONDS).to_pylist())
        pre = np.asarray(table.column(S.PREPROCESS_SECONDS).to_pylist())
        assert (decode >= 0).all() and (pre >= 0).all()
    for table in (alone, both):  # each video decodes, converts, scales and crops (its rows share the time)
        for col in (S.DECODE_SECONDS, S.PREPROCESS_SECONDS):
            per_video = {}
            for vid, seconds in zip(table.column(S.VIDEO_ID).to_pylist(), table.column(col).to_pylist(), strict=True):
                per_video[vid] = per_video.get(vid, 0.0) + seconds
            assert sorted(per_video) == sorted(CLIPS) and min(per_video.values()) > 0, (col, per_video)


RECORDED = json.loads(DIGESTS.read_text())


@pytest.mark.parametrize(
    ("clip", "read", "fps", "hold"),
    [
        ("mmaction2_demo.mp4", "read-auto", 1.0, 1),  # more timeline frames than may be held: two decodes
        ("mmaction2_test.avi", "read-decord", 7.0, 512),  # AVI with B-frames: decode-order stamps, two decodes
        ("paddlevideo_example.avi", "read-auto", 7.0, 512),  # AVI without B-frames: one decode
    ],
)
def test_one_pass_falls_back_to_two_where_it_must(clip, read, fps, hold):
    sampled, timeline = one_pass_digests(clip, read, fps, hold)
    assert sampled == RECORDED[f"{clip}/{read}"]
    assert timeline == RECORDED[f"{clip}/timeline-{fps:g}"]
