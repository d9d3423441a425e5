"""Sampled decoding against VideoTag's golden preprocessing and against generated clips that
encode their own frame ordinals."""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from tests.clips import frame_ordinal, truncate, write_audio_only, write_indexed_clip
from tests.conftest import EXAMPLES, GOLDEN, ROOT
from vtplatform.video.decode import BadVideo, DecodeOptions, sample_clip
from vtplatform.video.transforms import normalize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GOLDEN_CLIPS = [("demo", "mmaction2_demo.mp4"), ("data_example", "paddlevideo_example.avi")]


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize(("name", "clip"), GOLDEN_CLIPS)
def test_reproduces_golden_preprocessing(name, clip, decoder):
    g = np.load(GOLDEN / f"preprocess_{name}.npz")
    out = sample_clip(str(EXAMPLES / clip), DecodeOptions(decoder=decoder))
    assert out.decoder == decoder
    assert out.num_frames == int(g["num_decoded_frames"])
    assert (out.height, out.width) == tuple(g["original_hw"])
    np.testing.assert_array_equal(out.indices, g["frame_indices"])
    keep = g["keep_positions"]
    np.testing.assert_array_equal(out.frames[keep], g["frames_crop_uint8"])  # exact crops, same FFmpeg and Pillow
    x = normalize(out.frames, MEAN, STD).reshape(300, -1).astype(np.float64)
    np.testing.assert_allclose(x.mean(1), g["frame_mean"], atol=1e-6)
    np.testing.assert_allclose(x.std(1), g["frame_std"], atol=1e-6)
    np.testing.assert_allclose(
        normalize(out.frames[keep], MEAN, STD), g["frames_norm_f16"].astype(np.float32), atol=2e-3
    )


def test_decoded_frames_match_golden_checksums():
    """The decoded RGB frames before resizing are bit-identical to VideoTag's (same FFmpeg 5.1 swscale)."""
    import decord

    g = np.load(GOLDEN / "preprocess_data_example.npz")
    reader = decord.VideoReader(str(EXAMPLES / "paddlevideo_example.avi"))
    frames = reader.get_batch(sorted(set(g["frame_indices"].tolist()))).asnumpy()
    by_index = dict(zip(sorted(set(g["frame_indices"].tolist())), frames, strict=True))
    crcs = [zlib.crc32(np.ascontiguousarray(by_index[i]).tobytes()) for i in g["frame_indices"]]
    np.testing.assert_array_equal(crcs, g["decoded_rgb_crc32"])


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_samples_the_right_frames_of_a_long_clip(tmp_path, decoder):
    # 700 frames with B-frames: avg = 2, so the samples are frames 0, 2, 4, ... 598.
    clip = write_indexed_clip(tmp_path / "long.mp4", 700, bf="3")
    out = sample_clip(str(clip), DecodeOptions(decoder=decoder))
    assert out.num_frames == 700
    assert [frame_ordinal(f) for f in out.frames] == out.indices.tolist()
    assert out.indices.tolist() == list(range(0, 600, 2))


def test_long_videos_stream_through_pyav(tmp_path):
    clip = write_indexed_clip(tmp_path / "long.mp4", 700, bf="3")
    streamed = sample_clip(str(clip), DecodeOptions(decord_max_frames=500))
    assert streamed.decoder == "pyav-stream" and streamed.num_frames == 700
    assert [frame_ordinal(f) for f in streamed.frames] == streamed.indices.tolist()
    by_decord = sample_clip(str(clip), DecodeOptions(decoder="decord", decord_max_frames=500))
    assert by_decord.decoder == "decord"  # an explicit choice is kept
    np.testing.assert_array_equal(streamed.frames, by_decord.frames)
    np.testing.assert_array_equal(streamed.indices, by_decord.indices)


def test_stream_falls_back_when_the_index_promises_more_frames():
    # decord indexes 50 packets; only 49 decode: the stream comes up short and PyAV counts first.
    out = sample_clip(str(EXAMPLES / "decord_corrupted.mp4"), DecodeOptions(decord_max_frames=10))
    assert (out.decoder, out.num_frames) == ("pyav", 49)


CODEC_CASES = [
    ("h264_bframes.mkv", "libx264", {"bf": "3"}),
    ("h264.flv", "libx264", {}),
    ("h264.ts", "libx264", {}),
    ("hevc.mp4", "libx265", {"x265-params": "log-level=none"}),
    ("hevc.ts", "libx265", {"x265-params": "log-level=none"}),  # decord seeks to the wrong frames
    ("vp9.webm", "libvpx-vp9", {}),
    ("vp8.webm", "libvpx", {}),
    ("av1.mkv", "libsvtav1", {}),  # decord's FFmpeg cannot decode AV1
    ("mpeg4_bframes.avi", "mpeg4", {"bf": "3"}),  # decord returns frames out of order
    ("mpeg4.mp4", "mpeg4", {}),
    ("mpeg2.mpg", "mpeg2video", {}),  # MPEG-PS: decord returns a neighbour
    ("mpeg1.mpg", "mpeg1video", {}),
    ("mjpeg.avi", "mjpeg", {}),
    ("wmv2.wmv", "wmv2", {}),  # ASF: decord returns a neighbour
    ("ffv1.mkv", "ffv1", {}),
]


@pytest.mark.parametrize(("name", "codec", "options"), CODEC_CASES, ids=[c[0] for c in CODEC_CASES])
def test_codecs_and_containers_give_the_sampled_frames(tmp_path, name, codec, options):
    """Sparse sampling (60 frames, 20 segments) on many codecs and containers returns exactly the
    frames the rule asks for, whichever decoder the file is routed to."""
    clip = write_indexed_clip(tmp_path / name, 60, 160, 128, codec=codec, **options)
    out = sample_clip(str(clip), DecodeOptions(num_segments=20))
    assert out.num_frames == 60
    assert [frame_ordinal(f) for f in out.frames] == out.indices.tolist() == list(range(1, 60, 3)), out.decoder


def test_short_clip_wraps_and_segments_option(tmp_path):
    clip = write_indexed_clip(tmp_path / "short.mkv", 7, width=160, height=120)
    out = sample_clip(str(clip), DecodeOptions(num_segments=10))
    assert out.frames.shape == (10, 224, 224, 3)
    assert [frame_ordinal(f) for f in out.frames] == [i % 7 for i in range(10)]


@pytest.mark.parametrize("angle", [0, 90, 180, 270])
def test_frames_follow_display_rotation(angle):
    """Both decoders return frames as a player shows them: portrait for 90/270, and the same pixels."""
    path = str(EXAMPLES / f"decord_rotation_{angle}.mov")
    a = sample_clip(path, DecodeOptions(num_segments=3, decoder="decord"))
    b = sample_clip(path, DecodeOptions(num_segments=3, decoder="pyav"))
    assert (a.width, a.height) == ((320, 568) if angle in (90, 270) else (568, 320))
    assert (b.width, b.height) == (a.width, a.height)
    np.testing.assert_array_equal(a.frames, b.frames)


def test_rotation_is_applied_not_ignored():
    import av

    path = str(EXAMPLES / "decord_rotation_90.mov")
    with av.open(path) as c:
        raw = next(c.decode(video=0)).to_ndarray(format="rgb24")  # stored landscape
    out = sample_clip(path, DecodeOptions(num_segments=3, short_size=256, target_size=224))
    from vtplatform.video.transforms import scale_and_crop

    np.testing.assert_array_equal(out.frames[0], scale_and_crop(np.ascontiguousarray(np.rot90(raw, 3))))
    assert not np.array_equal(out.frames[0], scale_and_crop(raw))


def test_damaged_file_falls_back_to_pyav():
    out = sample_clip(str(EXAMPLES / "decord_corrupted.mp4"), DecodeOptions())
    assert out.decoder == "pyav"
    assert out.num_frames == 49  # ffmpeg decodes 49 of the 50 declared frames
    assert out.frames.shape == (300, 224, 224, 3)


def test_truncated_file_is_partly_decoded(tmp_path):
    clip = write_indexed_clip(tmp_path / "full.mp4", 400)
    cut = truncate(clip, tmp_path / "cut.mp4", 0.5)
    out = sample_clip(str(cut), DecodeOptions())
    assert out.decoder == "pyav"  # decord fails whole on truncated files
    assert 100 < out.num_frames < 400
    assert [frame_ordinal(f) for f in out.frames] == out.indices.tolist()


def test_one_frame_video_is_valid(tmp_path):
    out = sample_clip(str(write_indexed_clip(tmp_path / "one.mp4", 1)), DecodeOptions())
    assert out.num_frames == 1 and set(out.indices.tolist()) == {0}


@pytest.mark.parametrize(
    ("make", "stage", "error_type"),
    [
        (lambda p: p.write_bytes(b""), "read", "EmptyFile"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(50_000)), "decode", "DecodeError"),
        (lambda p: p.write_text("this is not a video\n" * 100), "decode", "DecodeError"),
        (lambda p: write_audio_only(p.with_suffix(".m4a")).rename(p), "decode", "NoVideoStream"),
        (lambda p: p.mkdir(), "read", "IsADirectoryError"),
        (lambda p: None, "read", "FileNotFoundError"),
    ],
    ids=["zero-bytes", "random-bytes", "text-as-mp4", "audio-only", "directory", "missing"],
)
def test_bad_inputs_raise_bad_video(tmp_path, make, stage, error_type):
    path = tmp_path / "bad.mp4"
    make(path)
    with pytest.raises(BadVideo) as info:
        sample_clip(str(path), DecodeOptions())
    assert (info.value.stage, info.value.error_type) == (stage, error_type)
    assert info.value.message


def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.mp4"
    if os.geteuid() == 0:  # root reads whatever the mode: use a file whose read fails with EIO instead
        path.symlink_to("/proc/self/mem")
    else:
        write_indexed_clip(path, 5).chmod(0)
    with pytest.raises(BadVideo) as info:
        sample_clip(str(path), DecodeOptions())
    assert info.value.stage == "read"
    assert info.value.error_type in ("PermissionError", "OSError")


PEAK_RSS = """
import sys
sys.path.insert(0, {root!r})
from vtplatform.video.decode import DecodeOptions, sample_clip
sample_clip(sys.argv[1], DecodeOptions(decoder=sys.argv[2]))
# VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's peak across fork+exec)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024)
"""
HOLD_ALL = """
import sys
import av
with av.open(sys.argv[1]) as c:
    frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]  # what the seed's loader did
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024)
"""


@pytest.mark.parametrize("decoder", ["auto", "pyav"])
def test_peak_memory_does_not_grow_with_length(tmp_path, decoder):
    """Decoding 3000 frames must not hold them: at 480x360 they would take 1.5 GB."""
    short = write_indexed_clip(tmp_path / "short.mp4", 300, 480, 360)
    long = write_indexed_clip(tmp_path / "long.mp4", 3000, 480, 360)
    code = PEAK_RSS.format(root=str(ROOT))
    peaks = [
        int(subprocess.check_output([sys.executable, "-c", code, str(p), decoder], text=True).split()[-1])
        for p in (short, long)
    ]
    assert peaks[1] - peaks[0] < 150, f"peak RSS {peaks[0]} MB for 300 frames, {peaks[1]} MB for 3000 frames"
    # The measurement can fail: holding every frame, as the seed did, shows the growth.
    held = [
        int(subprocess.check_output([sys.executable, "-c", HOLD_ALL, str(p)], text=True).split()[-1])
        for p in (short, long)
    ]
    assert held[1] - held[0] > 1000, f"holding all frames: {held[0]} MB vs {held[1]} MB"
