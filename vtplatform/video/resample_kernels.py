"""The compiled passes of ``resample.resize_crop`` (imports numba: import it only through ``resample``).

Compiled when this module is first imported, for the one signature each pass has, and cached by
numba on disk (``cache=True``: next to this file, or in the user's cache folder where this one is
not writable), so a later process, a Ray worker's included, loads the machine code instead of
compiling it again.
"""

from __future__ import annotations

import numba
import numpy as np

from vtplatform.video.resample import PRECISION_BITS

HALF = 1 << (PRECISION_BITS - 1)  # Pillow's rounding: every sum starts at one half
BLOCK_ROWS = 32  # source rows transposed at a time in the horizontal pass
_INDEX, _WEIGHTS = numba.types.Array(numba.int32, 1, "C"), numba.types.Array(numba.int32, 2, "C")
_OUT = numba.types.Array(numba.uint8, 2, "C")
# a source frame may be read-only (numpy's view of a decord frame is): one signature for each
_SOURCES = [numba.types.Array(numba.uint8, 2, "C", readonly=ro) for ro in (False, True)]
_I = numba.int64


@numba.njit(
    [numba.void(src, _I, _I, _I, _I, _INDEX, _INDEX, _WEIGHTS, _OUT) for src in _SOURCES], cache=True, nogil=True
)
def hpass(src, r0, r1, x0, x1, first, count, weights, out):
    """Pillow's horizontal pass over source rows ``r0..r1`` (``src``: rows of W * 3 bytes) for the
    output columns that ``first``/``count``/``weights`` describe, reading source columns ``x0..x1``;
    into ``out`` (rows ``r0..r1``, 3 bytes per output column).

    A block of rows is transposed into ``buf[x, row * 3 + channel]``, so that each (output column,
    tap) is one multiply-add over a contiguous vector; every sum is Pillow's, term for term."""
    n_out = first.shape[0]
    nx = x1 - x0
    buf = np.zeros((nx, BLOCK_ROWS * 3), np.uint8)
    acc = np.empty(BLOCK_ROWS * 3, np.int32)
    for yb in range(r0, r1, BLOCK_ROWS):
        nb = min(BLOCK_ROWS, r1 - yb)
        for b in range(nb):
            row = src[yb + b, x0 * 3 : x1 * 3]  # a view, so that no index needs a negative-index check
            o = b * 3
            for x in range(nx):
                buf[x, o] = row[3 * x]
                buf[x, o + 1] = row[3 * x + 1]
                buf[x, o + 2] = row[3 * x + 2]
        for j in range(n_out):
            for m in range(BLOCK_ROWS * 3):
                acc[m] = HALF
            p = first[j] - x0
            for t in range(count[j]):
                w = weights[j, t]
                column = buf[p + t]  # a row of buf: its values for source column x0 + p + t
                for m in range(BLOCK_ROWS * 3):
                    acc[m] += np.int32(column[m]) * w
            for b in range(nb):
                for c in range(3):
                    out[yb + b - r0, j * 3 + c] = min(max(acc[b * 3 + c] >> PRECISION_BITS, 0), 255)


@numba.njit([numba.void(src, _I, _I, _INDEX, _INDEX, _WEIGHTS, _OUT) for src in _SOURCES], cache=True, nogil=True)
def vpass(src, c0, c1, first, count, weights, out):
    """Pillow's vertical pass over the bytes ``c0..c1`` of ``src``'s rows (rows of W * 3 bytes):
    ``out[i] = clip8(sum over taps t of src[first[i] + t, c0:c1] * weights[i, t])``, a whole row
    of bytes at a time."""
    n = c1 - c0
    acc = np.empty(n, np.int32)
    for i in range(first.shape[0]):
        for m in range(n):
            acc[m] = HALF
        for t in range(count[i]):
            w = weights[i, t]
            row = src[first[i] + t, c0:c1]  # a view: indexing row[m] lets the loop vectorize
            for m in range(n):
                acc[m] += np.int32(row[m]) * w
        for m in range(n):
            out[i, m] = min(max(acc[m] >> PRECISION_BITS, 0), 255)
