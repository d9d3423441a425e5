"""VideoTag's frame preprocessing: short-side scale, centre crop, normalisation."""

from __future__ import annotations

import numpy as np
from PIL import Image


def scaled_size(width: int, height: int, short_size: int = 256) -> tuple[int, int]:
    """VideoTag's ``group_scale``: keep a frame whose short side is already ``short_size``;
    otherwise resize to exactly (4/3 * short, short) or (short, 4/3 * short), ignoring the
    aspect ratio (341x256 for landscape and square frames, 256x341 for portrait)."""
    if (width <= height and width == short_size) or (height <= width and height == short_size):
        return width, height
    long_size = int(short_size * 4.0 / 3.0)
    return (short_size, long_size) if width < height else (long_size, short_size)


def crop_offsets(width: int, height: int, target_size: int = 224) -> tuple[int, int]:
    """(h_off, w_off) of the centre crop, with Python 3's round-half-to-even as in VideoTag."""
    return int(round((height - target_size) / 2.0)), int(round((width - target_size) / 2.0))


def scale_and_crop(rgb: np.ndarray, short_size: int = 256, target_size: int = 224) -> np.ndarray:
    """One decoded RGB frame (H, W, 3) uint8 -> its centre crop (target, target, 3) uint8.

    Resizing is Pillow's bilinear filter on uint8, as VideoTag did (it antialiases when
    downscaling, unlike ``cv2.resize``).
    """
    height, width = rgb.shape[:2]
    size = scaled_size(width, height, short_size)
    if size != (width, height):
        rgb = np.asarray(Image.fromarray(rgb, "RGB").resize(size, Image.BILINEAR))
    h_off, w_off = crop_offsets(size[0], size[1], target_size)
    return np.ascontiguousarray(rgb[h_off : h_off + target_size, w_off : w_off + target_size])


def normalize(frames: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32: ``/255``, then ``-= mean``, then ``/= std``."""
    x = frames.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    x -= np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return x
