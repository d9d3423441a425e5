"""Pillow's bilinear resize, bit for bit, computing only the pixels a crop keeps.

VideoTag's preprocessing resizes a frame to exactly 341x256 (or 256x341) with Pillow's bilinear
filter and keeps a 224x224 crop of it. ``resize_crop`` returns that crop without computing the rest,
with the integer arithmetic of Pillow 13's ``src/libImaging/Resample.c``:

* ``bilinear_coeffs`` is ``precompute_coeffs`` (double precision, the box ``0..in_size`` of a full
  resize, each output's weights divided by their sum) followed by ``normalize_coeffs_8bpc`` (each
  weight rounded half away from zero to a fixed-point integer of ``PRECISION_BITS`` fractional bits).
  The box starts at 0, so no multiply-add there could be fused differently by a compiler: the same
  doubles, hence the same integers, come out on any IEEE-754 machine.
* Then two passes, each into 8 bits (``clip8((2**21 + sum(pixel * weight)) >> 22)``), in Pillow 13's
  order (``horizontal_first``: horizontal then vertical, unless the height shrinks by more than twice
  as many pixels as the width), and only the passes whose size changes (Pillow's
  ``need_horizontal``/``need_vertical``).
* Each value of the first pass depends on one source row (or column) and one output column (or
  row); each output pixel on the first pass's values along one column (or row). So the crop needs
  the first pass only for the crop's own columns (rows) and for the source rows (columns) the
  crop's weights reach, and gets exactly the values Pillow computes for those pixels.
* With bilinear weights (all >= 0, each output's summing to 2**22 give or take one unit per tap) a
  sum stays in [0, 255 * (2**22 + taps) + 2**21], well inside 32 bits, and ``clip8``'s table (-640 to
  639 after the shift) reduces to clamping to [0, 255].

The passes are compiled with numba (``resample_kernels``; ``cache=True``: compiled once per machine
and numba version, then loaded from numba's cache). Without numba, or with another Pillow than 13
(Pillow 13 changed the order of the passes, so the bytes depend on Pillow's version), or with
``backend="pillow"``, Pillow's own full resize is cropped instead: the same bytes as Pillow 13 gives
(tests/video/test_resample.py compares them on many frame sizes).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

PRECISION_BITS = 32 - 8 - 2  # Pillow's: 8 bits of result, 2 bits of headroom
PILLOW_MAJOR = "13"  # the Pillow whose Resample.c this reproduces


@functools.lru_cache(maxsize=64)
def bilinear_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's fixed-point bilinear weights for resizing ``in_size`` pixels to ``out_size``:
    ``(first, count, weights)``, where output ``i`` is the weighted sum of input pixels
    ``first[i] .. first[i] + count[i] - 1`` with ``weights[i, :count[i]]`` (int32, zero beyond).
    The arrays are cached and shared between calls: do not write to them."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got {in_size} -> {out_size}")
    in0, in1 = 0.0, float(np.float32(in_size))  # Pillow takes the box in single precision
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    ksize = math.ceil(support) * 2 + 1
    first = np.zeros(out_size, np.int32)
    count = np.zeros(out_size, np.int32)
    weights = np.zeros((out_size, ksize), np.int32)
    one = float(1 << PRECISION_BITS)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        raw, ww = [], 0.0
        for x in range(xmax):
            d = abs((x + xmin - center + 0.5) * ss)
            w = 1.0 - d if d < 1.0 else 0.0
            raw.append(w)
            ww += w
        for x, w in enumerate(raw):
            if ww != 0.0:
                w /= ww
            weights[xx, x] = int(-0.5 + w * one) if w < 0 else int(0.5 + w * one)
        first[xx], count[xx] = xmin, xmax
    return first, count, weights


def resize_crop(
    rgb: np.ndarray, size: tuple[int, int], top: int, left: int, height: int, width: int, backend: str = "auto"
) -> np.ndarray:
    """``np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))[top:top + height, left:left + width]``,
    byte for byte, computing only that crop. ``rgb`` is (H, W, 3) uint8; ``size`` is (width, height)
    as Pillow takes it; the crop must lie inside ``size``. ``backend``: ``auto`` (compiled when numba
    and Pillow 13 are installed), ``numba`` (raises ImportError without them) or ``pillow``."""
    out_w, out_h = size
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 frame, got {rgb.shape} {rgb.dtype}")
    if not (height > 0 and width > 0 and 0 <= top <= out_h - height and 0 <= left <= out_w - width):
        raise ValueError(f"crop {width}x{height} at ({left}, {top}) is not inside {out_w}x{out_h}")
    kernels = None if backend == "pillow" else _kernels(required=backend == "numba")
    if kernels is None:
        return _pillow(rgb, size, top, left, height, width)
    hpass, vpass = kernels
    in_h, in_w = rgb.shape[:2]
    plan = _plan(in_w, in_h, out_w, out_h, top, left, height, width)
    flat = np.ascontiguousarray(rgb).reshape(in_h, in_w * 3)
    first, second = plan.first, plan.second
    mid = np.empty(plan.mid_shape, np.uint8) if first is not None else np.ascontiguousarray(flat[plan.rows, plan.cols])
    if first is not None:
        (hpass if plan.horizontal_first else vpass)(flat, *first, mid)
    if second is None:
        return mid.reshape(height, width, 3)
    out = np.empty((height, width * 3), np.uint8)
    (vpass if plan.horizontal_first else hpass)(mid, *second, out)
    return out.reshape(height, width, 3)


@dataclass(frozen=True)
class _Plan:
    """The two passes' arguments for one geometry (frame size, output size, crop); None: no such pass."""

    horizontal_first: bool
    mid_shape: tuple[int, int]  # the first pass's output (rows, bytes)
    first: tuple | None  # the first pass's arguments after the source
    second: tuple | None  # the second pass's arguments after the first pass's output
    rows: slice  # without a first pass: the source rows and bytes the second pass reads
    cols: slice


@functools.lru_cache(maxsize=64)
def _plan(in_w: int, in_h: int, out_w: int, out_h: int, top: int, left: int, height: int, width: int) -> _Plan:
    need_horizontal, need_vertical = out_w != in_w, out_h != in_h
    v_first, v_count, v_weights = (a[top : top + height] for a in bilinear_coeffs(in_h, out_h))
    h_first, h_count, h_weights = (a[left : left + width] for a in bilinear_coeffs(in_w, out_w))
    if horizontal_first(in_w, in_h, out_w, out_h):
        # the source rows the crop's rows reach, through the horizontal pass (the crop's columns only)
        r0, r1 = (int(v_first[0]), int((v_first + v_count).max())) if need_vertical else (top, top + height)
        x0, x1 = int(h_first[0]), int((h_first + h_count).max())
        first = (r0, r1, x0, x1, h_first, h_count, h_weights) if need_horizontal else None
        second = (0, width * 3, v_first - np.int32(r0), v_count, v_weights) if need_vertical else None
        return _Plan(True, (r1 - r0, width * 3), first, second, slice(r0, r1), slice(left * 3, (left + width) * 3))
    # Pillow 13 runs the vertical pass first here (so need_vertical): over the source columns the crop's reach
    x0, x1 = (int(h_first[0]), int((h_first + h_count).max())) if need_horizontal else (left, left + width)
    first = (x0 * 3, x1 * 3, v_first, v_count, v_weights)
    second = (0, height, 0, x1 - x0, h_first - np.int32(x0), h_count, h_weights) if need_horizontal else None
    return _Plan(False, (height, (x1 - x0) * 3), first, second, slice(0), slice(0))


def horizontal_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pillow 13's order of the two passes: horizontal first, unless the height shrinks by more
    than twice as many pixels as the width does."""
    return not (in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2)


def _pillow(rgb: np.ndarray, size: tuple[int, int], top: int, left: int, height: int, width: int) -> np.ndarray:
    from PIL import Image

    full = np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").resize(size, Image.BILINEAR))
    return np.ascontiguousarray(full[top : top + height, left : left + width])


_lock = threading.Lock()
_compiled: list = []  # [] until tried; then [(hpass, vpass)] or [None]


def _kernels(required: bool = False):
    """The compiled passes, or None where numba is not installed or Pillow is not version 13 (logged once)."""
    if not _compiled:
        with _lock:
            if not _compiled:
                _compiled.append(_load())
    if _compiled[0] is None and required:
        raise ImportError("the compiled resize needs numba and Pillow 13")
    return _compiled[0]


def _load():
    import PIL

    if PIL.__version__.split(".")[0] != PILLOW_MAJOR:
        log.warning("Pillow %s is not %s.x: resizing with Pillow's full resize", PIL.__version__, PILLOW_MAJOR)
        return None
    try:
        return _compile()
    except ImportError as exc:
        log.warning("numba is not installed (%s): resizing with Pillow's full resize", exc)
        return None


def _compile():
    from vtplatform.video import resample_kernels

    return resample_kernels.hpass, resample_kernels.vpass
