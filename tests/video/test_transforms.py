import io

import numpy as np
import pytest
from PIL import Image

from vtplatform.video.transforms import crop_offsets, normalize, scale_and_crop, scaled_size, thumbnail_jpeg


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((340, 256), (340, 256)),  # short side already 256: no resize at all
        ((256, 500), (256, 500)),
        ((320, 240), (341, 256)),  # landscape: exactly 341x256, aspect ignored
        ((1920, 1080), (341, 256)),
        ((240, 320), (256, 341)),  # portrait
        ((300, 300), (341, 256)),  # square counts as landscape
    ],
)
def test_group_scale(size, expected):
    assert scaled_size(*size) == expected


def test_centre_crop_uses_round_half_even():
    # (341 - 224) / 2 = 58.5 -> 58 in Python 3 (59 in Python 2, which shifts values by up to 1.9)
    assert crop_offsets(341, 256) == (16, 58)
    assert crop_offsets(340, 256) == (16, 58)
    assert crop_offsets(256, 341) == (58, 16)


def test_scale_and_crop_shape_and_content():
    rgb = np.zeros((240, 320, 3), np.uint8)
    rgb[:, :160] = 200
    out = scale_and_crop(rgb)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # After the 341-wide resize the edge sits at 170.5, so crop column 112 (= 170 in the resized frame) is the edge.
    assert out[100, 0, 0] == 200 and out[100, 223, 0] == 0


def test_normalize_matches_videotag_float32_order():
    frames = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = normalize(frames, mean, std)
    expected = frames.astype(np.float32).transpose(0, 3, 1, 2) / 255
    expected -= np.array(mean, np.float32).reshape(3, 1, 1)
    expected /= np.array(std, np.float32).reshape(3, 1, 1)
    assert x.dtype == np.float32 and x.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((320, 240), 160, (160, 120)),
        ((240, 568), 160, (68, 160)),
        ((100, 60), 160, (100, 60)),
        ((1920, 1080), 64, (64, 36)),
    ],
)
def test_thumbnail_jpeg_keeps_the_aspect_and_never_enlarges(size, max_side, expected):
    width, height = size
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2] = (200, 40, 40)  # red left half, blue right half
    rgb[:, width // 2 :] = (40, 40, 200)
    data = thumbnail_jpeg(rgb, max_side=max_side)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == expected
    back = np.asarray(image.convert("RGB")).astype(int)
    w = expected[0]
    assert np.abs(back[:, : w // 4] - (200, 40, 40)).max() < 12
    assert np.abs(back[:, -w // 4 :] - (40, 40, 200)).max() < 12
    assert len(thumbnail_jpeg(rgb, max_side=max_side, quality=20)) <= len(data)
