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
BLOCK_ROWS = 32  # source rows transposed at a time in the horizontal pass: 4 rows a 32-bit word, 8 words a channel
LANES = BLOCK_ROWS * 3
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

    A block of 32 rows is transposed into ``buf[x, channel * 32 + row]``, so that each (output
    column, tap) is one multiply-add over a contiguous vector of 96 lanes; every sum is Pillow's,
    term for term (the lanes are independent, so their order does not matter). The transpose
    writes a 32-bit word of 4 rows at a time (``words``, whose bytes ``buf`` is), a quarter of the
    scattered stores of one byte at a time. The sums of a block go to ``tile[column, lane]`` and
    then into ``out``'s rows."""
    n_out = first.shape[0]
    nx = x1 - x0
    last = src.shape[0] - 1
    words = np.zeros((nx, LANES // 4), np.uint32)  # [x, c * 8 + g]: byte q is channel c of row 4 * g + q
    buf = words.view(np.uint8)  # [x, c * 32 + row]
    acc = np.empty(LANES, np.int32)
    tile = np.empty((n_out, LANES), np.uint8)
    for yb in range(r0, r1, BLOCK_ROWS):
        nb = min(BLOCK_ROWS, r1 - yb)
        for g in range(BLOCK_ROWS // 4):
            y = yb + 4 * g  # rows past r1 repeat the last row: read, never written out
            a = src[min(y, last), x0 * 3 : x1 * 3]  # views, so that no index needs a negative-index check
            b = src[min(y + 1, last), x0 * 3 : x1 * 3]
            c = src[min(y + 2, last), x0 * 3 : x1 * 3]
            d = src[min(y + 3, last), x0 * 3 : x1 * 3]
            for x in range(nx):
                for ch in range(3):
                    k = 3 * x + ch
                    words[x, ch * 8 + g] = (
                        np.uint32(a[k]) | (np.uint32(b[k]) << 8) | (np.uint32(c[k]) << 16) | (np.uint32(d[k]) << 24)
                    )
        for j in range(n_out):
            for m in range(LANES):
                acc[m] = HALF
            p = first[j] - x0
            for t in range(count[j]):
                w = weights[j, t]
                column = buf[p + t]  # a row of buf: its values for source column x0 + p + t
                for m in range(LANES):
                    acc[m] += np.int32(column[m]) * w
            sums = tile[j]
            for m in range(LANES):
                sums[m] = min(max(acc[m] >> PRECISION_BITS, 0), 255)
        for row in range(nb):
            o = out[yb + row - r0]
            for j in range(n_out):
                o[j * 3] = tile[j, row]
                o[j * 3 + 1] = tile[j, BLOCK_ROWS + row]
                o[j * 3 + 2] = tile[j, 2 * BLOCK_ROWS + row]


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
