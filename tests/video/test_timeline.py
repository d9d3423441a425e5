"""Reading a video's timeline (``video.reader.iter_timeline``): frames at a fixed rate of
presentation time, from generated clips whose frames encode their ordinals, variable frame rate
included, against the PTS they were written with."""

from __future__ import annotations

import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tests.clips import frame_ordinal, indexed_frame, truncate, write_audio_only, write_indexed_clip
from tests.conftest import EXAMPLES
from vtplatform.video.reader import BadVideo, ReadOptions, iter_timeline, read_frames
from vtplatform.video.transforms import scale_and_crop

# Irregular presentation times (ms): bursts, a 1.45 s gap, near-misses of whole seconds, a 2.5 s gap.
VFR_MS = [0, 100, 500, 550, 2000, 2040, 3100, 3999, 4000, 6500]


def write_vfr_clip(path: Path, times_ms: list[int], start_ms: int = 0) -> Path:
    """Frame i is ``indexed_frame(i)`` shown at ``start_ms + times_ms[i]`` (lossless H.264, B-frames)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"qp": "0", "preset": "ultrafast", "bf": "2"}
        for i, ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(indexed_frame(i, 320, 240), format="rgb24")
            frame.pts, frame.time_base = start_ms + ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def expected_picks(times_s: list[float], fps: float) -> list[int]:
    """The tick rule, spelled out: tick k/fps takes the first frame at or after it, each frame once."""
    picked: list[int] = []
    k = 0
    while k / fps <= times_s[-1]:
        first = next(i for i, t in enumerate(times_s) if t >= k / fps - 1e-9)
        if first not in picked:
            picked.append(first)
        k += 1
    return picked


def timeline(path, fps: float, per_frame=lambda rgb: rgb, **read) -> tuple[list[float], list[np.ndarray], object]:
    info, frames = iter_timeline(str(path), fps, per_frame, ReadOptions(**read))
    times, out = [], []
    for t, frame in frames:
        times.append(t)
        out.append(frame)
    return times, out, info


@pytest.mark.parametrize("start_ms", [0, 500])
@pytest.mark.parametrize("ext", ["mkv", "mp4"])
@pytest.mark.parametrize("fps", [1.0, 2.0])
def test_variable_frame_rate_picks_by_presentation_time(tmp_path, ext, start_ms, fps):
    clip = write_vfr_clip(tmp_path / f"vfr.{ext}", VFR_MS, start_ms)
    times, frames, info = timeline(clip, fps)
    picked = [frame_ordinal(f) for f in frames]
    # By index / average rate, frame 4 would be at 0.6 s and frame 9 at 5.9 s: only the PTS gives these.
    assert picked == ([0, 4, 6, 8, 9] if fps == 1.0 else [0, 2, 4, 6, 7, 8, 9])
    assert picked == expected_picks([ms / 1000 for ms in VFR_MS], fps)
    assert times == pytest.approx([VFR_MS[i] / 1000 for i in picked], abs=1e-9)  # from the stream start
    assert info.decoder == "pyav" and info.end_s == pytest.approx(6.54, abs=0.05)


@pytest.mark.parametrize("bf", ["0", "3"])
def test_constant_rate_clip_gives_one_frame_a_second(tmp_path, bf):
    clip = write_indexed_clip(tmp_path / "cfr.mp4", 90, bf=bf)  # 25 fps, 3.6 s
    times, frames, info = timeline(clip, 1.0, scale_and_crop)
    assert times == [0.0, 1.0, 2.0, 3.0]
    assert [frame_ordinal(f) for f in frames] == [0, 25, 50, 75]
    assert {f.shape for f in frames} == {(224, 224, 3)}
    assert info.fps == 25.0 and info.duration_s == pytest.approx(3.6) and info.end_s == pytest.approx(3.6)
    # A rate above the file's takes every frame, once.
    times, frames, _ = timeline(clip, 60.0)
    assert [frame_ordinal(f) for f in frames] == list(range(90))
    assert times == pytest.approx([i / 25 for i in range(90)])
    times, frames, _ = timeline(clip, 0.5)
    assert times == [0.0, 2.0] and [frame_ordinal(f) for f in frames] == [0, 50]


@pytest.mark.parametrize("clip", ["decord_rotation_90.mov", "mmaction2_demo.mp4"])
def test_frames_are_the_readers_frames(clip):
    """The same decoding, display rotation and preprocessing as extraction's reader."""
    path = str(EXAMPLES / clip)
    times, frames, info = timeline(path, 1.0 if clip.startswith("mmaction") else 100.0, scale_and_crop)
    indices = np.round(np.asarray(times) * info.fps).astype(int)
    assert len(set(indices.tolist())) == len(indices) > 1
    read = read_frames(path, lambda n: indices, scale_and_crop, ReadOptions(decoder="pyav"))
    np.testing.assert_array_equal(np.stack(frames), read.frames)


def test_streams_holding_one_frame_at_a_time(tmp_path):
    clip = write_indexed_clip(tmp_path / "long.mp4", 300, bf="3")  # 12 s at 320x240
    frame_bytes = 320 * 240 * 3
    info, frames = iter_timeline(str(clip), 25.0, lambda rgb: rgb, ReadOptions())
    t, first = next(frames)
    assert t == 0.0 and frame_ordinal(first) == 0
    assert info.end_s < 1.0  # the first frame came before the decoder got far into the file
    del first

    def peak(consume) -> int:
        """Peak of the Python heap while ``consume`` takes the frames (each a copy, so that it is
        on the traced heap: PyAV's own buffers are not)."""
        _, frames = iter_timeline(str(clip), 25.0, np.array, ReadOptions())
        tracemalloc.start()
        try:
            consume(frames)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    streamed = peak(lambda frames: sum(1 for _ in frames))
    held = peak(list)  # the measurement can fail: keeping the frames shows
    assert streamed < 4 * frame_bytes, f"peak {streamed} bytes while streaming 300 frames"
    assert held > 250 * frame_bytes


def test_damaged_packets_are_skipped(tmp_path):
    clip = write_indexed_clip(tmp_path / "cfr.mp4", 250)
    times, frames, _ = timeline(truncate(clip, tmp_path / "cut.mp4", 0.6), 1.0)
    picked = [frame_ordinal(f) for f in frames]
    assert 2 <= len(picked) < 10 and picked == [round(t * 25) for t in times]


@pytest.mark.parametrize(
    ("make", "error_type"),
    [
        (lambda p: p.write_bytes(b""), "EmptyFile"),
        (lambda p: p.write_bytes(b"not a video at all" * 100), "DecodeError"),
        (lambda p: write_audio_only(p.with_suffix(".m4a")).rename(p), "NoVideoStream"),
        (lambda p: p.mkdir(), "IsADirectoryError"),
    ],
)
def test_bad_files_raise_bad_video(tmp_path, make, error_type):
    path = tmp_path / "bad.mp4"
    make(path)
    with pytest.raises(BadVideo) as err:
        iter_timeline(str(path), 1.0, lambda rgb: rgb, ReadOptions())
    assert err.value.error_type == error_type


def test_fps_must_be_positive(tmp_path):
    clip = write_indexed_clip(tmp_path / "cfr.mp4", 5)
    with pytest.raises(ValueError, match="fps"):
        iter_timeline(str(clip), 0.0, lambda rgb: rgb, ReadOptions())
