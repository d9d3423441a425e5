"""The compiled crop-only resize gives, byte for byte, Pillow's full bilinear resize then the crop:
on frame sizes that take every branch (which pass first, which passes at all), portrait and
landscape, odd sizes, short sides above and below 256, frames a few pixels wide, and contents that
saturate (all 255, all 0, hard edges), for VideoTag's centre crop and for arbitrary crops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vtplatform.video.resample import bilinear_coeffs, horizontal_first, resize_crop
from vtplatform.video.transforms import crop_offsets, scale_and_crop, scaled_size

FIXED = [
    (320, 240), (426, 240), (640, 360), (640, 480), (720, 576), (1280, 720), (1920, 1080),  # landscape videos
    (240, 320), (360, 640), (480, 854), (720, 1280), (1080, 1920),  # portrait: 720x1280 runs vertical first
    (341, 300), (341, 257), (341, 200), (300, 341), (256, 300), (1000, 256),  # one pass only, or none
    (341, 256), (256, 341), (300, 300), (257, 257), (255, 255),  # exactly the output, squares
    (1, 1), (2, 3), (3, 2), (7, 1000), (1000, 7), (17, 33), (100, 57), (225, 224),  # tiny and thin
    (1001, 999), (999, 1001), (513, 1537), (2001, 1123), (3840, 2160),  # odd, large
]  # fmt: skip


def _sizes() -> list[tuple[int, int]]:
    rng = np.random.default_rng(21)
    drawn = [tuple(int(v) for v in rng.integers(1, 1400, 2)) for _ in range(40)]
    drawn += [tuple(int(v) for v in rng.integers(1, 300, 2)) for _ in range(15)]  # upscaling
    return FIXED + drawn


def _frame(width: int, height: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "noise":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "white":
        return np.full((height, width, 3), 255, np.uint8)
    if kind == "black":
        return np.zeros((height, width, 3), np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]  # hard 0/255 edges in both directions, channels apart
    return np.stack([((xx // 3) % 2) * 255, ((yy // 2) % 2) * 255, ((xx + yy) % 2) * 255], -1).astype(np.uint8)


def _pillow_crop(rgb: np.ndarray, size: tuple[int, int], top: int, left: int, h: int, w: int) -> np.ndarray:
    full = np.asarray(Image.fromarray(rgb, "RGB").resize(size, Image.BILINEAR))
    return full[top : top + h, left : left + w]


def test_the_sizes_take_every_branch():
    """Both pass orders, with both passes and with one: a size list that lost a branch fails here."""
    seen = set()
    for w, h in _sizes():
        out_w, out_h = scaled_size(w, h)
        if (out_w, out_h) != (w, h):
            seen.add((horizontal_first(w, h, out_w, out_h), out_w != w, out_h != h))
    assert seen == {
        (True, True, True),
        (True, False, True),
        (True, True, False),
        (False, True, True),
        (False, False, True),
    }


@pytest.mark.parametrize("kind", ["noise", "white", "black", "edges"])
def test_centre_crop_is_pillows_byte_for_byte(kind):
    rng = np.random.default_rng(len(kind))
    checked = 0
    for w, h in _sizes():
        if kind != "noise" and w * h > 1_500_000:
            continue
        rgb = _frame(w, h, kind, rng)
        size = scaled_size(w, h)
        top, left = crop_offsets(*size)
        want = _pillow_crop(rgb, size, top, left, 224, 224)
        got = scale_and_crop(rgb, backend="numba")  # compiled, or ImportError: never Pillow against itself
        assert got.shape == (224, 224, 3) and got.dtype == np.uint8
        assert np.array_equal(got, want), f"{w}x{h} ({kind}): {(got != want).sum()} values differ"
        checked += 1
    assert checked >= 80


def test_any_crop_of_any_size_is_pillows():
    """resize_crop on its own: random output sizes and crops (edges included), compiled and Pillow's."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        w, h = (int(v) for v in rng.integers(1, 900, 2))
        out_w, out_h = (int(v) for v in rng.integers(1, 500, 2))
        ch, cw = int(rng.integers(1, out_h + 1)), int(rng.integers(1, out_w + 1))
        top, left = int(rng.integers(0, out_h - ch + 1)), int(rng.integers(0, out_w - cw + 1))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = _pillow_crop(rgb, (out_w, out_h), top, left, ch, cw)
        got = resize_crop(rgb, (out_w, out_h), top, left, ch, cw, backend="numba")
        assert np.array_equal(got, want), f"{w}x{h} -> {out_w}x{out_h}, crop {cw}x{ch} at ({left}, {top})"
        assert np.array_equal(resize_crop(rgb, (out_w, out_h), top, left, ch, cw, backend="pillow"), want)


def test_a_non_contiguous_frame_gives_the_same_crop():
    rgb = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    turned = np.rot90(rgb)  # a view with negative strides, as a rotation would give
    assert np.array_equal(scale_and_crop(turned), scale_and_crop(np.ascontiguousarray(turned)))


def test_coefficients_are_pillows_fixed_point_weights():
    first, count, weights = bilinear_coeffs(1920, 341)
    assert weights.dtype == np.int32 and (weights >= 0).all()
    sums = weights.sum(axis=1)  # each output's weights: 2**22, give or take one unit per tap
    assert (np.abs(sums - (1 << 22)) <= count).all()
    assert first[0] == 0 and first[-1] + count[-1] == 1920 and (np.diff(first) >= 0).all()
    same = bilinear_coeffs(300, 300)  # no resize: each output is its own input, weight 1.0
    assert (same[1] <= 2).all() and (same[2][:, 0] == 1 << 22).all() and (same[2][:, 1:] == 0).all()


def test_a_crop_outside_the_output_is_refused():
    rgb = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="not inside"):
        resize_crop(rgb, (20, 20), 0, 0, 21, 5)
    with pytest.raises(ValueError, match="uint8"):
        resize_crop(rgb.astype(np.float32), (20, 20), 0, 0, 5, 5)


def test_a_read_only_frame_gives_the_same_crop():
    """numpy's view of a decord frame (``np.from_dlpack``) is read-only."""
    rgb = np.random.default_rng(4).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    frozen = rgb.copy()
    frozen.flags.writeable = False
    assert np.array_equal(scale_and_crop(frozen), scale_and_crop(rgb))
    portrait = np.ascontiguousarray(rgb.transpose(1, 0, 2))  # 360x640: the vertical pass reads the frame first
    portrait.flags.writeable = False
    assert np.array_equal(scale_and_crop(portrait), _pillow_crop(portrait, (256, 341), 58, 16, 224, 224))
