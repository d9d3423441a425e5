"""Reading frames (``video.reader``) against VideoTag's golden preprocessing and against generated
clips that encode their own frame ordinals: extraction's plan, chosen frames, every frame."""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from tests.clips import frame_ordinal, truncate, write_audio_only, write_indexed_clip
from tests.conftest import EXAMPLES, GOLDEN, ROOT
from vtplatform.config import load_config
from vtplatform.stages.decode import decode_options
from vtplatform.tsn_data import clip_spec
from vtplatform.video.reader import BadVideo, ReadOptions, infer_plan, iter_all_frames, read_frames, read_options
from vtplatform.video.sampling import segment_indices
from vtplatform.video.transforms import normalize, scale, scale_and_crop

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GOLDEN_CLIPS = [("demo", "mmaction2_demo.mp4"), ("data_example", "paddlevideo_example.avi")]


def read_as_extraction(path: str, num_segments: int = 300, short_size: int = 256, target_size: int = 224, **read):
    """Extraction's read: VideoTag's inference plan."""
    return read_frames(path, *infer_plan(num_segments, short_size, target_size), ReadOptions(**read))


@pytest.mark.parametrize("decoder", ["decord", "pyav", "pyav-stream"])
@pytest.mark.parametrize(("name", "clip"), GOLDEN_CLIPS)
def test_reproduces_golden_preprocessing(name, clip, decoder):
    g = np.load(GOLDEN / f"preprocess_{name}.npz")
    read = {"decord_max_frames": 10} if decoder == "pyav-stream" else {"decoder": decoder}  # the memory guard
    out = read_as_extraction(str(EXAMPLES / clip), **read)
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


def test_pyav_frames_match_golden_checksums():
    """The reader's default path (PyAV's FFmpeg 8, one converter per stream) gives VideoTag's decoded
    RGB frames (FFmpeg 5.1's swscale, through OpenCV) whole and bit for bit, as decord's FFmpeg 4.1 does."""
    g = np.load(GOLDEN / "preprocess_data_example.npz")
    info, frames = iter_all_frames(str(EXAMPLES / "paddlevideo_example.avi"), lambda f: f.copy(), ReadOptions())
    crcs = [zlib.crc32(np.ascontiguousarray(f).tobytes()) for f in frames]
    assert info.decoder == "pyav" and len(crcs) == 131
    np.testing.assert_array_equal([crcs[i] for i in g["frame_indices"]], g["decoded_rgb_crc32"])


@pytest.mark.parametrize(
    ("name", "codec", "pix_fmt", "size"),
    [
        ("h264.mp4", "libx264", "yuv420p", (426, 240)),
        ("h264_odd.mkv", "libx264", "yuv420p", (322, 182)),
        ("h264_444.mp4", "libx264", "yuv444p", (340, 256)),
        ("mjpeg.avi", "mjpeg", "yuvj420p", (330, 250)),
        ("vp9.webm", "libvpx-vp9", "yuv420p", (648, 360)),
        ("hevc.mp4", "libx265", "yuv420p", (1282, 720)),
    ],
)
def test_decord_and_pyav_decode_to_the_same_rgb_bytes(tmp_path, name, codec, pix_fmt, size):
    """Every whole RGB frame of files decord decodes exactly is the same bytes from decord (its own
    FFmpeg 4.1) and from PyAV (FFmpeg 8), at frame widths that are and are not multiples of 8 or 16
    and with noise that exercises every rounding: the reader's default moved from decord to PyAV
    on these files, and the crops (and features) must not change with it."""
    from tests.clips import write_clip

    rng = np.random.default_rng(7)
    width, height = size
    frames = (rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(6))
    options = {"x265-params": "log-level=none"} if codec == "libx265" else {}
    clip = write_clip(tmp_path / name, frames, width, height, 25, codec, pix_fmt, options)
    whole = lambda f: f.copy()  # noqa: E731
    by_decord = list(iter_all_frames(str(clip), whole, ReadOptions("decord"))[1])
    by_pyav = list(iter_all_frames(str(clip), whole, ReadOptions())[1])
    assert len(by_decord) == len(by_pyav) == 6
    assert by_pyav[0].shape == (size[1], size[0], 3)
    for a, b in zip(by_decord, by_pyav, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_samples_the_right_frames_of_a_long_clip(tmp_path, decoder):
    # 700 frames with B-frames: avg = 2, so the samples are frames 0, 2, 4, ... 598.
    clip = write_indexed_clip(tmp_path / "long.mp4", 700, bf="3")
    out = read_as_extraction(str(clip), decoder=decoder)
    assert out.num_frames == 700
    assert [frame_ordinal(f) for f in out.frames] == out.indices.tolist()
    assert out.indices.tolist() == list(range(0, 600, 2))


def test_long_videos_stream_through_pyav(tmp_path):
    clip = write_indexed_clip(tmp_path / "long.mp4", 700, bf="3")
    streamed = read_as_extraction(str(clip), decord_max_frames=500)
    assert streamed.decoder == "pyav-stream" and streamed.num_frames == 700
    assert [frame_ordinal(f) for f in streamed.frames] == streamed.indices.tolist()
    by_decord = read_as_extraction(str(clip), decoder="decord", decord_max_frames=500)
    assert by_decord.decoder == "decord"  # an explicit choice is kept
    np.testing.assert_array_equal(streamed.frames, by_decord.frames)
    np.testing.assert_array_equal(streamed.indices, by_decord.indices)


def test_stream_falls_back_when_the_index_promises_more_frames():
    # decord indexes 50 packets; only 49 decode: the stream comes up short and PyAV counts first.
    out = read_as_extraction(str(EXAMPLES / "decord_corrupted.mp4"), decord_max_frames=10)
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
    out = read_as_extraction(str(clip), num_segments=20)
    assert out.num_frames == 60
    assert [frame_ordinal(f) for f in out.frames] == out.indices.tolist() == list(range(1, 60, 3)), out.decoder


@pytest.mark.parametrize(
    ("name", "codec", "options", "decoder"),
    [
        ("gop5.mp4", "libx264", {"g": "5", "bf": "2"}, "decord"),  # keyframes closer than the picks: decord seeks
        ("gop5.mkv", "libx264", {"g": "5"}, "decord"),
        ("gop250.mp4", "libx264", {"bf": "2"}, "pyav-stream"),  # one keyframe: seeking decodes as much
        ("gop5_bframes.avi", "mpeg4", {"g": "5", "bf": "2"}, "pyav-stream"),  # decord's seeking is wrong here
    ],
)
def test_sparse_reads_seek_with_decord_where_it_pays(tmp_path, name, codec, options, decoder):
    """A sparse plan (training's: 3 frames of 120) goes to decord's seeking on files it seeks
    exactly when that decodes under a third of what PyAV's pass decodes; a dense one (extraction's
    300 samples) never does. Either way the frames are exactly the picks."""
    clip = write_indexed_clip(tmp_path / name, 120, 160, 128, codec=codec, **options)
    picks = np.array([17, 58, 101])
    sparse = read_frames(str(clip), lambda n: picks, lambda f: f, ReadOptions())
    assert sparse.decoder == decoder
    assert [frame_ordinal(f) for f in sparse.frames] == picks.tolist()
    never = read_frames(str(clip), lambda n: picks, lambda f: f, ReadOptions(decord_max_frames=0))
    assert never.decoder == "pyav-stream"
    np.testing.assert_array_equal(never.frames, sparse.frames)
    dense = read_as_extraction(str(clip), num_segments=60)
    assert dense.decoder == "pyav-stream"
    assert [frame_ordinal(f) for f in dense.frames] == dense.indices.tolist()


def test_seeking_pays_counts_the_frames_decord_decodes():
    from vtplatform.video.reader import _seeking_pays

    every_10 = np.arange(0, 100, 10)
    # decord decodes 0..5, 50..55 and 90..95: 18 frames, 3 x 18 = 54 < the 96 PyAV decodes (0..95)
    assert _seeking_pays(np.array([5, 55, 95]), every_10)
    # one keyframe: decord decodes 0..95 too
    assert not _seeking_pays(np.array([5, 55, 95]), np.array([0]))
    # picks closer than the keyframes: decord goes on from where it is (0..9, then 10..33): 34 x 3 > 34
    assert not _seeking_pays(np.array([9, 12, 33]), every_10)
    assert not _seeking_pays(np.array([3]), np.zeros(0, np.int64))


def test_a_packet_that_fails_before_the_last_pick_makes_the_stream_count_first():
    """decord_corrupted.mp4: 50 packets, packet 30 fails to decode, 49 frames decode. With 4
    segments the last pick (41) comes after the failure, where PyAV's frame ordinals are one off
    the packets': the one pass must not return those frames but count the frames that decode and
    pick among them, as VideoTag did (and as forced PyAV does), with or without a timeline."""
    from vtplatform.video.reader import read_frames_and_timeline

    path = str(EXAMPLES / "decord_corrupted.mp4")
    auto = read_as_extraction(path, num_segments=4)
    forced = read_as_extraction(path, num_segments=4, decoder="pyav")
    assert (auto.decoder, auto.num_frames, auto.indices.tolist()) == ("pyav", 49, [5, 17, 29, 41])
    np.testing.assert_array_equal(auto.frames, forced.frames)
    info, timeline = read_frames_and_timeline(path, *infer_plan(4), 1.0, ReadOptions())
    assert len(list(timeline)) >= 1
    assert (info.sampled.decoder, info.sampled.num_frames) == ("pyav", 49)
    np.testing.assert_array_equal(info.sampled.frames, auto.frames)


def test_short_clip_wraps_and_segments_option(tmp_path):
    clip = write_indexed_clip(tmp_path / "short.mkv", 7, width=160, height=120)
    out = read_as_extraction(str(clip), num_segments=10)
    assert out.frames.shape == (10, 224, 224, 3)
    assert [frame_ordinal(f) for f in out.frames] == [i % 7 for i in range(10)]


@pytest.mark.parametrize("angle", [0, 90, 180, 270])
def test_frames_follow_display_rotation(angle):
    """Both decoders return frames as a player shows them: portrait for 90/270, and the same pixels."""
    path = str(EXAMPLES / f"decord_rotation_{angle}.mov")
    a = read_as_extraction(path, num_segments=3, decoder="decord")
    b = read_as_extraction(path, num_segments=3, decoder="pyav")
    assert (a.width, a.height) == ((320, 568) if angle in (90, 270) else (568, 320))
    assert (b.width, b.height) == (a.width, a.height)
    np.testing.assert_array_equal(a.frames, b.frames)


def test_rotation_is_applied_not_ignored():
    import av

    path = str(EXAMPLES / "decord_rotation_90.mov")
    with av.open(path) as c:
        raw = next(c.decode(video=0)).to_ndarray(format="rgb24")  # stored landscape
    out = read_as_extraction(path, num_segments=3, short_size=256, target_size=224)
    np.testing.assert_array_equal(out.frames[0], scale_and_crop(np.ascontiguousarray(np.rot90(raw, 3))))
    assert not np.array_equal(out.frames[0], scale_and_crop(raw))


def test_damaged_file_falls_back_to_pyav():
    out = read_as_extraction(str(EXAMPLES / "decord_corrupted.mp4"))
    assert out.decoder == "pyav"
    assert out.num_frames == 49  # ffmpeg decodes 49 of the 50 declared frames
    assert out.frames.shape == (300, 224, 224, 3)


def test_truncated_file_is_partly_decoded(tmp_path):
    clip = write_indexed_clip(tmp_path / "full.mp4", 400)
    cut = truncate(clip, tmp_path / "cut.mp4", 0.5)
    out = read_as_extraction(str(cut))
    assert out.decoder == "pyav"  # decord fails whole on truncated files
    assert 100 < out.num_frames < 400
    assert [frame_ordinal(f) for f in out.frames] == out.indices.tolist()


def test_one_frame_video_is_valid(tmp_path):
    out = read_as_extraction(str(write_indexed_clip(tmp_path / "one.mp4", 1)))
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
        read_as_extraction(str(path))
    assert (info.value.stage, info.value.error_type) == (stage, error_type)
    assert info.value.message


def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.mp4"
    if os.geteuid() == 0:  # root reads whatever the mode: use a file whose read fails with EIO instead
        path.symlink_to("/proc/self/mem")
    else:
        write_indexed_clip(path, 5).chmod(0)
    with pytest.raises(BadVideo) as info:
        read_as_extraction(str(path))
    assert info.value.stage == "read"
    assert info.value.error_type in ("PermissionError", "OSError")


PEAK_RSS = """
import sys
sys.path.insert(0, {root!r})
from vtplatform.video.reader import ReadOptions, infer_plan, read_frames
read_frames(sys.argv[1], *infer_plan(300), ReadOptions(decoder=sys.argv[2]))
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


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_indexed_clip(tmp_path_factory.mktemp("frames") / "indexed.mp4", 90)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    # a keyframe every 5 frames: training's sparse picks seek with decord when it may take the file
    return write_indexed_clip(tmp_path_factory.mktemp("frames") / "long.mp4", 150, bf="3", g="5")


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_read_frames_returns_the_chosen_frames_in_the_given_order(clip, decoder):
    wanted = np.array([77, 3, 3, 40, 89, 0])
    out = read_frames(
        str(clip), lambda n: wanted if n == 90 else None, lambda f: f, ReadOptions(decoder=decoder, chunk_frames=2)
    )
    assert out.decoder == decoder and out.num_frames == 90
    assert [frame_ordinal(f) for f in out.frames] == wanted.tolist()
    np.testing.assert_array_equal(out.indices, wanted)
    assert (out.width, out.height) == (320, 240)


def test_read_frames_applies_the_per_frame_transform(clip):
    out = read_frames(str(clip), lambda n: np.array([5]), scale, ReadOptions())
    assert out.frames.shape == (1, 256, 341, 3)
    assert frame_ordinal(out.frames[0]) == 5


def test_read_frames_rejects_indices_outside_the_video(clip):
    with pytest.raises(ValueError, match=r"\[0, 90\)"):
        read_frames(str(clip), lambda n: np.array([n]), lambda f: f, ReadOptions())


@pytest.mark.parametrize("decoder", ["auto", "decord", "pyav"])
def test_iter_all_frames_streams_every_frame_in_order(clip, decoder):
    """``auto`` streams every frame through PyAV (decord would decode the same frames at a higher cost)."""
    info, frames = iter_all_frames(str(clip), lambda f: f[:8, :8].copy(), ReadOptions(decoder=decoder, chunk_frames=4))
    ordinals = []
    for f in frames:
        assert f.shape == (8, 8, 3)  # the top-left corner: 4 * (i % 64) grey
        ordinals.append(round(float(f.mean()) / 4))
    assert len(ordinals) == 90
    assert ordinals == [i % 64 for i in range(90)]
    assert info.decoder == ("decord" if decoder == "decord" else "pyav")
    assert info.num_frames == (90 if decoder == "decord" else -1)


def test_bad_files_raise_bad_video(tmp_path, clip):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(BadVideo) as err:
        read_frames(str(empty), lambda n: np.array([0]), lambda f: f, ReadOptions())
    assert err.value.error_type == "EmptyFile"
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    with pytest.raises(BadVideo):
        iter_all_frames(str(junk), lambda f: f, ReadOptions())
    cut = truncate(clip, tmp_path / "cut.mp4", 0.02)
    with pytest.raises(BadVideo):
        read_frames(str(cut), lambda n: np.array([n - 1]), lambda f: f, ReadOptions())


def test_real_clip_streams_as_many_frames_as_decord_counts():
    path = str(EXAMPLES / "mmaction2_part_0.mp4")
    info, frames = iter_all_frames(path, lambda f: f[:2, :2].copy(), ReadOptions(decoder="decord"))
    assert sum(1 for _ in frames) == info.num_frames == 32
    info, frames = iter_all_frames(path, lambda f: f[:2, :2].copy(), ReadOptions())
    assert (sum(1 for _ in frames), info.decoder) == (32, "pyav")


def test_read_frames_gets_exact_frames_where_decord_seeks_wrongly(tmp_path):
    """MPEG-4 Part 2 with B-frames: decord's sparse seeking returns frames out of order; the
    reader streams such files through PyAV and gets exactly the chosen frames."""
    clip = write_indexed_clip(tmp_path / "xvid_like.avi", 60, 160, 128, codec="mpeg4", bf="3")
    chosen = np.array([5, 17, 42, 43, 58])
    out = read_frames(str(clip), lambda n: chosen, lambda f: f, ReadOptions())
    assert out.decoder == "pyav-stream"
    assert [frame_ordinal(f) for f in out.frames] == chosen.tolist()


def _training_plan(seed: int):
    """TSN training's sampling (random offsets in 8 segments of 2 frames) and its per-frame scale."""
    rng = np.random.default_rng(seed)
    return (lambda n: segment_indices(n, 8, 2, rng)), scale


def test_memory_guard_applies_to_training_reads(long_clip):
    """A clip longer than ``decord_max_frames`` streams through PyAV on the training path too, and
    gives the very frames decord gives."""
    streamed = read_frames(str(long_clip), *_training_plan(3), ReadOptions(decord_max_frames=100))
    by_decord = read_frames(str(long_clip), *_training_plan(3), ReadOptions(decoder="decord", decord_max_frames=100))
    under = read_frames(str(long_clip), *_training_plan(3), ReadOptions(decord_max_frames=150))
    assert (streamed.decoder, by_decord.decoder, under.decoder) == ("pyav-stream", "decord", "decord")
    assert streamed.num_frames == by_decord.num_frames == 150
    assert streamed.frames.shape == (16, 256, 341, 3)
    assert [frame_ordinal(f) for f in streamed.frames] == streamed.indices.tolist()
    assert len(set(streamed.indices.tolist())) == 16  # random offsets, pairs of consecutive frames
    np.testing.assert_array_equal(streamed.indices, by_decord.indices)
    np.testing.assert_array_equal(streamed.frames, by_decord.frames)
    np.testing.assert_array_equal(under.frames, by_decord.frames)


def test_memory_guard_applies_to_the_all_frames_stream(long_clip):
    """The frame cache's every-frame read of a long clip streams through PyAV, frame for frame as decord."""
    corner = lambda f: f[:8, :8].copy()  # noqa: E731
    info, frames = iter_all_frames(str(long_clip), corner, ReadOptions(decord_max_frames=100))
    streamed = list(frames)
    assert (info.decoder, info.num_frames) == ("pyav", -1)
    info, frames = iter_all_frames(str(long_clip), corner, ReadOptions(decoder="decord", decord_max_frames=100))
    assert (info.decoder, info.num_frames) == ("decord", 150)
    np.testing.assert_array_equal(np.stack(streamed), np.stack(list(frames)))
    assert [round(float(f.mean()) / 4) for f in streamed] == [i % 64 for i in range(150)]


def test_every_reader_gets_the_memory_guard_from_the_config():
    config = load_config(None, ["extract.decord_max_frames=77", "extract.chunk_frames=3", "extract.decoder=pyav"])
    options = read_options(config)
    assert options == ReadOptions(decoder="pyav", threads=1, chunk_frames=3, decord_max_frames=77)
    assert decode_options(config).read == options  # extraction and tagging
    for mode in ("train", "valid", "test", "infer"):  # training and evaluation (the frame cache reads the same)
        assert clip_spec(config, mode, 0).read == options
