"""VideoTag's frame preprocessing: short-side scale, centre crop, normalisation; and thumbnails."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vtplatform.video.resample import resize_crop


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
    return round((height - target_size) / 2.0), round((width - target_size) / 2.0)


def scale_and_crop(rgb: np.ndarray, short_size: int = 256, target_size: int = 224, backend: str = "auto") -> np.ndarray:
    """One decoded RGB frame (H, W, 3) uint8 -> its centre crop (target, target, 3) uint8.

    Resizing is Pillow's bilinear filter on uint8, as VideoTag did (it antialiases when
    downscaling, unlike ``cv2.resize``). Only the crop is computed (``resample.resize_crop``, the
    same bytes as Pillow's full resize cropped; ``backend`` as there).
    """
    height, width = rgb.shape[:2]
    size = scaled_size(width, height, short_size)
    h_off, w_off = crop_offsets(size[0], size[1], target_size)
    inside = 0 <= h_off <= size[1] - target_size and 0 <= w_off <= size[0] - target_size
    if size != (width, height) and inside:
        return resize_crop(rgb, size, h_off, w_off, target_size, target_size, backend)
    rgb = scale(rgb, short_size)
    return np.ascontiguousarray(rgb[h_off : h_off + target_size, w_off : w_off + target_size])


def normalize(frames: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32: ``/255``, then ``-= mean``, then ``/= std``."""
    x = frames.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    x -= np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return x


def scale(rgb: np.ndarray, short_size: int = 256) -> np.ndarray:
    """VideoTag's ``group_scale`` of one RGB frame (H, W, 3) uint8 (see ``scaled_size``)."""
    height, width = rgb.shape[:2]
    size = scaled_size(width, height, short_size)
    if size == (width, height):
        return rgb
    return np.asarray(Image.fromarray(rgb, "RGB").resize(size, Image.BILINEAR))


def random_crop_offsets(width: int, height: int, target_size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(h_off, w_off) of a random crop: ``w_off`` is drawn first, then ``h_off``, each uniform over
    every valid offset (both ends included), as ``group_crop(is_center=False)`` draws them."""
    if width < target_size or height < target_size:
        raise ValueError(f"frame {width}x{height} is smaller than the crop size {target_size}")
    w_off = int(rng.integers(0, width - target_size, endpoint=True))
    h_off = int(rng.integers(0, height - target_size, endpoint=True))
    return h_off, w_off


def group_crop(frames: np.ndarray, h_off: int, w_off: int, target_size: int) -> np.ndarray:
    """The same crop of every frame: (N, H, W, 3) -> (N, target, target, 3)."""
    return np.ascontiguousarray(frames[:, h_off : h_off + target_size, w_off : w_off + target_size])


def group_flip(frames: np.ndarray) -> np.ndarray:
    """Horizontal flip of every frame of a video (N, H, W, 3)."""
    return np.ascontiguousarray(frames[:, :, ::-1])


def train_augment(frames: np.ndarray, target_size: int, rng: np.random.Generator) -> np.ndarray:
    """VideoTag's training transform of one video's scaled frames (N, H, W, 3) uint8: one random
    crop and one coin flip (probability 0.5) shared by all its frames. Draws, in order: the crop's
    ``w_off``, ``h_off``, then the flip."""
    h_off, w_off = random_crop_offsets(frames.shape[2], frames.shape[1], target_size, rng)
    out = group_crop(frames, h_off, w_off, target_size)
    return group_flip(out) if rng.random() < 0.5 else out


def centre_crop(frames: np.ndarray, target_size: int) -> np.ndarray:
    """VideoTag's evaluation crop of scaled frames (N, H, W, 3), round-half-even offsets."""
    h_off, w_off = crop_offsets(frames.shape[2], frames.shape[1], target_size)
    return group_crop(frames, h_off, w_off, target_size)


def thumbnail_jpeg(rgb: np.ndarray, max_side: int = 160, quality: int = 80) -> bytes:
    """A small JPEG of one RGB frame (H, W, 3) uint8: its aspect ratio kept, its longer side at
    most ``max_side`` (never enlarged), Pillow's bilinear (antialiased) resize, baseline JPEG."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    height, width = rgb.shape[:2]
    ratio = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if size != (width, height):
        image = image.resize(size, Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
