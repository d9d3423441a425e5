"""Memory of the decode stage's timeline (``jobs/tag.py --segments``) on a long file against a
short one, measured side by side in one run (these machines are noisy).

    python benchmarks/timeline_memory.py [--long-minutes 20] [--fps 8] [--size 320x240] [--no-held]

Writes a short and a long synthetic H.264 clip (moving colour noise, ``--source-fps``), then for
each runs ``stages.decode.decode_videos`` with a timeline (``--fps`` frames a second, windows of
``--segment`` seconds every ``--stride``) and tag.yaml's 300 segments in a fresh process that
takes each yielded block and drops it, as the next stage does. Reported per clip: the peak RSS
(VmHWM) of that process and its growth over its RSS just before decoding (VmHWM is reset there
through /proc/self/clear_refs, so the imports' peak does not count), the timeline frames,
windows, chunks and blocks it yielded, the largest block, and the seconds taken. Then the
long/short ratio of the growth, against what holding the long clip's timeline crops at once
would take (timeline frames x 224 x 224 x 3 bytes): the decode stage must hold about one chunk
(``FRAMES_PER_BLOCK`` crops, plus a window) at a time, whatever the video's length. The long
clip runs again with ``windows.chunk_windows`` given its whole timeline at once, the way an
implementation holding the video's timeline would behave (``--no-held`` skips it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CROP_BYTES = 224 * 224 * 3
MB = 1 << 20

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import av, numpy as np, pyarrow as pa, pyarrow.compute as pc, PIL.Image
from vtplatform import schema as S
from vtplatform.config import StorageSection
from vtplatform.stages.decode import DecodeOptions, TimelineOptions, decode_videos
from vtplatform.video.reader import ReadOptions

def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) // 1024

a = json.loads(sys.argv[1])
if a["held"]:  # the baseline an implementation that holds a video's timeline would give
    import vtplatform.stages.decode as D
    chunk_windows = D.chunk_windows
    D.chunk_windows = lambda frames, *rest: chunk_windows(list(frames), *rest)
timeline = TimelineOptions(a["fps"], a["segment_s"], a["stride_s"])
options = DecodeOptions(a["segments"], 256, 224, ReadOptions(), timeline)
batch = pa.table({{S.VIDEO_ID: ["v"], S.URI: [a["path"]]}})
try:  # VmHWM from here on: the decode's peak, not the imports'
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:  # then VmHWM may be the imports' peak: the growth can only read high
    pass
base = status("VmRSS")
start = time.perf_counter()
out = dict(frames=0, windows=0, chunks=0, blocks=0, block_mb=0.0, failures=0, crops=0)
for table in decode_videos(batch, options, StorageSection()):  # each block taken and dropped
    out["blocks"] += 1
    out["block_mb"] = max(out["block_mb"], table.nbytes / 2**20)
    out["failures"] += table.num_rows - table.column(S.STAGE).null_count
    out["crops"] += sum(table.column(S.NUM_FRAMES).fill_null(0).to_pylist())
    chunks = table.filter(pc.is_valid(table.column(S.CHUNK)))
    out["chunks"] += chunks.num_rows
    out["frames"] += sum(chunks.column(S.TIMELINE_FRAMES).to_pylist())
    out["windows"] += sum(chunks.column(S.WINDOWS).to_pylist())
    del table, chunks
out["seconds"] = time.perf_counter() - start
out["base_mb"], out["peak_mb"] = base, status("VmHWM")
print(json.dumps(out))
"""


def measure(path: Path, fps: float, segment_s: float, stride_s: float, segments: int, held: bool = False) -> dict:
    """One decode of ``path`` in a fresh process (its own VmHWM), blocks dropped as they come;
    ``held``: with ``windows.chunk_windows`` given the whole timeline at once (``list(frames)``)."""
    args = dict(path=str(path), fps=fps, segment_s=segment_s, stride_s=stride_s, segments=segments, held=held)
    code = CHILD.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short-seconds", type=float, default=10.0)
    p.add_argument("--long-minutes", type=float, default=20.0)
    p.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the clips")
    p.add_argument("--source-fps", type=int, default=25, help="the clips' frame rate")
    p.add_argument("--fps", type=float, default=8.0, help="timeline frames a second (tag.timeline_fps; 1 by default)")
    p.add_argument("--segment", type=float, default=10.0, help="window seconds (--segments of jobs/tag.py)")
    p.add_argument("--stride", type=float, default=5.0, help="window start to next window start, seconds")
    p.add_argument("--segments", type=int, default=300, help="the video's own sampled crops (INFER.seg_num)")
    p.add_argument("--no-held", action="store_true", help="skip the long clip with its timeline held whole")
    args = p.parse_args()
    width, height = map(int, args.size.split("x"))
    sys.path.insert(0, str(ROOT / "tests"))
    from clips import write_noise_clip

    from vtplatform.stages.decode import FRAMES_PER_BLOCK

    lengths = {"short": args.short_seconds, "long": 60 * args.long_minutes}
    print(
        f"decode_videos with a timeline at {args.fps:g} frames/s, {args.segment:g} s windows every {args.stride:g} s, "
        f"{args.segments} segments; H.264 {width}x{height} at {args.source_fps} fps; "
        f"FRAMES_PER_BLOCK {FRAMES_PER_BLOCK} ({FRAMES_PER_BLOCK * CROP_BYTES / MB:.0f} MB of crops)"
    )
    runs = {}
    with tempfile.TemporaryDirectory(prefix="vtp-bench-") as tmp:
        for name, seconds in lengths.items():
            start = time.perf_counter()
            frames = round(seconds * args.source_fps)
            clip = write_noise_clip(Path(tmp) / f"{name}.mp4", frames, width, height, fps=args.source_fps)
            print(
                f"    wrote the {name} clip: {seconds:g} s, {frames} frames, {clip.stat().st_size / MB:.1f} MB, "
                f"in {time.perf_counter() - start:.1f} s"
            )
            runs[name] = (seconds, measure(clip, args.fps, args.segment, args.stride, args.segments))
        if not args.no_held:
            runs["long, held"] = (
                lengths["long"],
                measure(clip, args.fps, args.segment, args.stride, args.segments, True),
            )
    print(
        f"\n    {'clip':<10} {'length':>7} {'tl frames':>9} {'windows':>7} {'chunks':>6} {'blocks':>6} {'max block':>9} "
        f"{'base MB':>7} {'peak MB':>7} {'growth MB':>9} {'crops MB':>8} {'seconds':>7}"
    )
    for name, (seconds, r) in runs.items():
        if r["failures"]:
            raise SystemExit(f"the {name} clip failed to decode: {r}")
        print(
            f"    {name:<10} {seconds:>6.0f}s {r['frames']:>9} {r['windows']:>7} {r['chunks']:>6} {r['blocks']:>6} "
            f"{r['block_mb']:>6.0f} MB {r['base_mb']:>7} {r['peak_mb']:>7} {r['peak_mb'] - r['base_mb']:>9} "
            f"{r['frames'] * CROP_BYTES / MB:>8.0f} {r['seconds']:>7.1f}"
        )
    short, long = runs["short"][1], runs["long"][1]
    grow_s, grow_l = short["peak_mb"] - short["base_mb"], long["peak_mb"] - long["base_mb"]
    held = long["frames"] * CROP_BYTES / MB
    print(
        f"\n    long/short: length {lengths['long'] / lengths['short']:.0f}x, timeline frames "
        f"{long['frames'] / short['frames']:.0f}x, peak RSS growth {grow_l} / {grow_s} MB = {grow_l / max(grow_s, 1):.2f}x"
    )
    print(
        f"    the long clip's {long['frames']} timeline crops held at once: {held:.0f} MB "
        f"({long['frames'] / FRAMES_PER_BLOCK:.1f} blocks of {FRAMES_PER_BLOCK}), {held / max(grow_l, 1):.1f}x its whole growth"
    )
    if "long, held" in runs:
        r = runs["long, held"][1]
        grow_h = r["peak_mb"] - r["base_mb"]
        print(
            f"    held whole (windows.chunk_windows over list(frames)): growth {grow_h} MB, {grow_h / max(grow_l, 1):.2f}x streamed"
        )


if __name__ == "__main__":
    main()
