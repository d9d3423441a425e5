"""Decoding chosen frames and streaming every frame, against clips that encode their ordinals."""

import numpy as np
import pytest

from tests.clips import frame_ordinal, truncate, write_indexed_clip
from tests.conftest import EXAMPLES
from vtplatform.video.decode import BadVideo
from vtplatform.video.frames import ReadOptions, iter_all_frames, read_frames
from vtplatform.video.transforms import scale


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_indexed_clip(tmp_path_factory.mktemp("frames") / "indexed.mp4", 90)


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


@pytest.mark.parametrize("decoder", ["auto", "pyav"])
def test_iter_all_frames_streams_every_frame_in_order(clip, decoder):
    info, frames = iter_all_frames(str(clip), lambda f: f[:8, :8].copy(), ReadOptions(decoder=decoder, chunk_frames=4))
    ordinals = []
    for f in frames:
        assert f.shape == (8, 8, 3)  # the top-left corner: 4 * (i % 64) grey
        ordinals.append(round(float(f.mean()) / 4))
    assert len(ordinals) == 90
    assert ordinals == [i % 64 for i in range(90)]
    assert info.decoder == ("decord" if decoder == "auto" else "pyav")
    assert info.num_frames == (90 if decoder == "auto" else -1)


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
    info, frames = iter_all_frames(str(EXAMPLES / "mmaction2_part_0.mp4"), lambda f: f[:2, :2].copy(), ReadOptions())
    assert sum(1 for _ in frames) == info.num_frames == 32


def test_read_frames_gets_exact_frames_where_decord_seeks_wrongly(tmp_path):
    """MPEG-4 Part 2 with B-frames: decord's sparse seeking returns frames out of order; the
    reader routes such files to PyAV and gets exactly the chosen frames."""
    clip = write_indexed_clip(tmp_path / "xvid_like.avi", 60, 160, 128, codec="mpeg4", bf="3")
    chosen = np.array([5, 17, 42, 43, 58])
    out = read_frames(str(clip), lambda n: chosen, lambda f: f, ReadOptions())
    assert out.decoder == "pyav"
    assert [frame_ordinal(f) for f in out.frames] == chosen.tolist()
