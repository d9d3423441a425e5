"""Memory of the decode stage's timeline (``jobs/tag.py --segments``) on a long file against a
short one: the timeline rows of one video must not hold the whole video in memory.

Each decode runs ``stages.decode.decode_videos`` in a fresh process that takes every yielded
block and drops it, as the next stage does, and reports its peak RSS (VmHWM, reset through
/proc/self/clear_refs after the imports) over its RSS just before decoding. The long clip is
low-resolution and every frame is a timeline frame, so that its timeline crops (224x224x3
each) would take well over a gigabyte held at once while the clip stays cheap to write and
decode; ``benchmarks/timeline_memory.py`` measures the same at realistic sizes and rates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from tests.conftest import ROOT

FPS = 25  # the clips' frame rate and the timeline's: every frame is a timeline frame
SEGMENT_S, STRIDE_S = 4.0, 2.0  # overlapping windows: chunks repeat a window's frames (new_from)
SHORT_FRAMES = 10 * FPS  # 10 s: under one block
LONG_FRAMES = 9000  # 6 min: 9000 crops of 147 KB = 1292 MB held at once, 17 blocks of 512
SIZE = 256  # square frames at the short side the crop wants: no resize, the cheapest decode
CROP_BYTES = 224 * 224 * 3
MB = 1 << 20

# The bounds, in MB of growth over the baseline. The stage holds a chunk of crops (512, and up to
# a window more: ~79 MB here) a few times over while it packs one (the chunk's frames, np.stack of
# them, their bytes, the Arrow block built from those) and the previous chunk's frames until the
# next chunk replaces it, plus what the allocators keep: measured ~520-540 MB for the long clip
# whatever its length, ~170-200 MB for the short one's single block. Holding the long clip's
# timeline adds its 1292 MB of crops: chunk_windows over list(frames) measured 1783 MB in this
# harness, failing both bounds; dropping one frame in 1000 fails check_covers. The test measures
# 1292 MB of crops held ("hold"), so that the harness is shown to see such growth.
LIMIT_MB = 1000
BLOCKS_OVER_SHORT = 7  # the long clip's growth over the short one's, in blocks

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import av, numpy as np, pyarrow as pa, PIL.Image
from tests.clips import frame_ordinal
from vtplatform import schema as S
from vtplatform.config import StorageSection
from vtplatform.stages.decode import DecodeOptions, TimelineOptions, decode_videos
from vtplatform.video.reader import ReadOptions

def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) // 1024

path, mode = sys.argv[1], sys.argv[2]
options = DecodeOptions(8, 256, 224, ReadOptions(), TimelineOptions({fps}, {segment_s}, {stride_s}))
batch = pa.table({{S.VIDEO_ID: ["v"], S.URI: [path]}})
try:  # VmHWM from here on: the decode's peak, not the imports'
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:  # then VmHWM may be the imports' peak: the growth can only read high
    pass
base = status("VmRSS")
out = dict(chunks=[], last=[], times=[], ordinals=[], windows=[], own=[], failures=[], blocks=0, block_mb=0, bad_bytes=0)
start = time.perf_counter()
if mode == "hold":  # what holding the timeline would take: each frame's crop, all kept
    held = [np.full((224, 224, 3), i % 256, np.uint8) for i in range(int(sys.argv[3]))]
    del held
else:
    for table in decode_videos(batch, options, StorageSection()):  # each block taken and dropped
        out["blocks"] += 1
        out["block_mb"] = max(out["block_mb"], table.nbytes / 2**20)
        for row in range(table.num_rows):
            get = lambda name: table.column(name)[row].as_py()
            if get(S.STAGE) is not None:
                out["failures"].append([get(S.STAGE), get(S.ERROR_TYPE), get(S.MESSAGE)])
                continue
            frames = table.column(S.FRAMES)[row].as_buffer()  # a view: no copy of the crops
            n = get(S.NUM_FRAMES)
            if get(S.CHUNK) is None:
                out["own"].append(n)
                continue
            out["bad_bytes"] += frames.size != len(get(S.T_SECONDS)) * 224 * 224 * 3
            crops = np.frombuffer(frames, np.uint8).reshape(-1, 224, 224, 3)
            new = get(S.NEW_FROM)
            out["chunks"].append(get(S.CHUNK))
            out["last"].append(get(S.LAST_CHUNK))
            out["times"] += get(S.T_SECONDS)[new:]
            out["ordinals"] += [frame_ordinal(c) for c in crops[new:]]
            out["windows"] += [list(w) for w in zip(get(S.WIN_INDEX), get(S.WIN_START), get(S.WIN_END))]
            del crops, frames
        del table
out["seconds"] = time.perf_counter() - start
out["growth_mb"] = status("VmHWM") - base
print(json.dumps(out))
"""


def write_grey_clip(path: Path, num_frames: int) -> Path:
    """``clips.write_indexed_clip``'s frames (each frame's ordinal in two grey levels, read back
    by ``clips.frame_ordinal``), lossless H.264, made as YUV directly: half the time of RGB input."""
    luma = np.round(16 + np.arange(256) * 219 / 255).astype(np.uint8)  # limited-range BT.601 grey
    yuv = np.full((SIZE * 3 // 2, SIZE), 128, np.uint8)  # I420: Y, then U and V (neutral)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        for i in range(num_frames):
            yuv[:SIZE, : SIZE // 2] = luma[4 * (i % 64)]
            yuv[:SIZE, SIZE // 2 :] = luma[16 * ((i // 64) % 16)]
            for packet in stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def start(path, mode: str = "decode", crops: int = 0) -> subprocess.Popen:
    """A fresh process measuring ``mode`` on ``path``: its own VmHWM, whatever runs beside it."""
    code = CHILD.format(root=str(ROOT), fps=FPS, segment_s=SEGMENT_S, stride_s=STRIDE_S)
    args = [sys.executable, "-c", code, str(path), mode, str(crops)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1])


def expected_windows(frames: int) -> list[list[float]]:
    """[k, start, end] of the windows over ``frames`` frames at FPS: starts every STRIDE_S until
    one reaches the end, which ends at the video's end (``segments.windows``, spelled out)."""
    end = frames / FPS
    out, k = [], 0
    while True:
        start = k * STRIDE_S
        out.append([k, start, min(start + SEGMENT_S, end)])
        if start + SEGMENT_S >= end or (k + 1) * STRIDE_S >= end:
            return out
        k += 1


def check_covers(result: dict, frames: int) -> None:
    """The blocks hold the whole video: every frame once as a new timeline frame, at its time and
    with its own pixels, in chunks 0..n-1 with only the last marked last, every window, and the
    video's own row."""
    assert result["failures"] == [] and result["own"] == [frames]
    n = len(result["chunks"])
    assert result["chunks"] == list(range(n)) and result["last"] == [False] * (n - 1) + [True]
    assert result["bad_bytes"] == 0
    assert len(result["times"]) == frames, f"{len(result['times'])} new timeline frames of {frames}"
    assert result["times"] == pytest.approx([i / FPS for i in range(frames)], abs=1e-6)
    assert result["ordinals"] == [i % 1024 for i in range(frames)]  # indexed_frame's ordinals wrap at 1024
    windows, expected = zip(*result["windows"], strict=True), zip(*expected_windows(frames), strict=True)
    for got, want in zip(windows, expected, strict=True):  # index, start, end
        assert got == pytest.approx(want, abs=1e-6)


def test_a_long_timeline_is_decoded_in_bounded_memory(tmp_path):
    """The timeline rows of one video must not hold the whole video: the long clip's decode grows
    by about what the short one's does plus a few blocks, far below its crops held at once."""
    # The short clip's decode and the holding measurement run while the long clip is written.
    short_clip = write_grey_clip(tmp_path / "short.mp4", SHORT_FRAMES)
    running = start(short_clip), start(short_clip, "hold", LONG_FRAMES)
    long_clip = write_grey_clip(tmp_path / "long.mp4", LONG_FRAMES)
    short, hold = map(result, running)
    long = result(start(long_clip))
    check_covers(short, SHORT_FRAMES)
    check_covers(long, LONG_FRAMES)
    assert len(long["chunks"]) >= LONG_FRAMES // 512 and long["blocks"] >= len(long["chunks"])
    held_mb = LONG_FRAMES * CROP_BYTES / MB
    bound = short["growth_mb"] + BLOCKS_OVER_SHORT * long["block_mb"]
    numbers = (
        f"peak RSS growth {short['growth_mb']} MB for {SHORT_FRAMES} timeline frames, {long['growth_mb']} MB for "
        f"{LONG_FRAMES} ({held_mb:.0f} MB of crops; blocks of up to {long['block_mb']:.0f} MB)"
    )
    assert long["growth_mb"] < LIMIT_MB, numbers
    assert long["growth_mb"] < bound, numbers
    # The bounds can fail: holding the long clip's crops, in the same harness, exceeds both.
    assert hold["growth_mb"] > max(LIMIT_MB, bound) + 100, f"holding {held_mb:.0f} MB of crops: {hold['growth_mb']} MB"
