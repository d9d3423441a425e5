"""TSN training/evaluation sampling and transforms (VideoTag's kinetics_reader rules)."""

import numpy as np
import pytest

from tests.conftest import GOLDEN
from vtplatform.video.sampling import infer_indices, segment_indices
from vtplatform.video.transforms import (
    centre_crop,
    group_crop,
    random_crop_offsets,
    scale,
    scale_and_crop,
    train_augment,
)


def test_centred_rule_equals_the_golden_inference_rule():
    golden = np.load(GOLDEN / "sampling_rule.npz")
    for n, expected in zip(golden["num_frames"], golden["indices"], strict=True):
        np.testing.assert_array_equal(segment_indices(int(n), 300), expected)
        np.testing.assert_array_equal(segment_indices(int(n), 7), infer_indices(int(n), 7))


def test_test_mode_takes_seven_centred_segments():
    # N=70, seg 7: avg 10, centre offset (10-1)//2 = 4
    np.testing.assert_array_equal(segment_indices(70, 7), [4, 14, 24, 34, 44, 54, 64])
    np.testing.assert_array_equal(segment_indices(30, 3), [4, 14, 24])


def test_training_offsets_cover_each_segment_inclusively():
    seen = [set() for _ in range(3)]
    for seed in range(400):
        idx = segment_indices(30, 3, rng=np.random.default_rng(seed))
        for i, v in enumerate(idx):
            assert 10 * i <= v <= 10 * i + 9  # inside its own segment
            seen[i].add(int(v) - 10 * i)
    assert all(s == set(range(10)) for s in seen)  # randint(0, avg - seglen): both ends reachable


def test_training_draws_are_reproducible_and_differ_between_seeds():
    a = segment_indices(1000, 3, rng=np.random.default_rng(7))
    b = segment_indices(1000, 3, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    draws = {tuple(segment_indices(1000, 3, rng=np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 15


@pytest.mark.parametrize("rng", [None, np.random.default_rng(0)])
def test_short_videos_wrap_like_videotag(rng):
    # avg = 2 // 3 = 0: segment i takes frame i, modulo N
    np.testing.assert_array_equal(segment_indices(2, 3, rng=rng), [0, 1, 0])


def test_seglen_takes_consecutive_frames():
    idx = segment_indices(30, 3, seglen=2)
    np.testing.assert_array_equal(idx, [4, 5, 14, 15, 24, 25])
    idx = segment_indices(30, 3, seglen=2, rng=np.random.default_rng(1)).reshape(3, 2)
    assert np.all(idx[:, 1] == idx[:, 0] + 1)
    # avg (4) < seglen (5): starts at i * avg without a random offset
    np.testing.assert_array_equal(segment_indices(12, 3, seglen=5, rng=np.random.default_rng(3))[::5], [0, 4, 8])


def _ramp(width=341, height=256, n=3):
    """Frames whose red channel is the column (mod 250), green the row: any crop or flip shows."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[:, :, 0] = (np.arange(width) % 250)[None, :]
    frame[:, :, 1] = (np.arange(height) % 250)[:, None]
    return np.stack([frame + i for i in range(n)])


def test_random_crop_offsets_cover_the_whole_range():
    hs, ws = set(), set()
    rng = np.random.default_rng(0)
    for _ in range(3000):
        h, w = random_crop_offsets(240, 230, 224, rng)
        hs.add(h)
        ws.add(w)
    assert hs == set(range(7)) and ws == set(range(17))


def test_train_augment_crops_and_flips_every_frame_alike():
    frames = _ramp()
    flips = 0
    for seed in range(200):
        out = train_augment(frames, 224, np.random.default_rng(seed))
        assert out.shape == (3, 224, 224, 3)
        rng = np.random.default_rng(seed)
        h_off, w_off = random_crop_offsets(341, 256, 224, rng)
        expected = group_crop(frames, h_off, w_off, 224)
        flipped = rng.random() < 0.5
        if flipped:
            expected = expected[:, :, ::-1]
            flips += 1
        np.testing.assert_array_equal(out, expected)
        # the same crop and flip for all frames: frame i is frame 0 plus i everywhere
        np.testing.assert_array_equal(out[2].astype(int) - out[0], 2)
    assert 70 < flips < 130


def test_centre_crop_of_scaled_frames_equals_scale_and_crop():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    np.testing.assert_array_equal(centre_crop(scale(rgb)[None], 224)[0], scale_and_crop(rgb))
    assert scale(rgb).shape == (256, 341, 3)
    same = rng.integers(0, 256, (256, 340, 3), dtype=np.uint8)
    assert scale(same) is same  # short side already 256: untouched
