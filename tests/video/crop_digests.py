"""Digests of the crops every reader path gives for the bundled clips, recorded before the reader
was made faster (``crop_digests.json``), so that a change to decoding or preprocessing that alters
a single byte of a single crop fails ``test_crop_digests.py``.

    python -m tests.video.crop_digests   # rewrites crop_digests.json: only to record a deliberate change

Each path is keyed ``clip/path``: ``read-<decoder>`` is extraction's read (300 segments, VideoTag's
scale and centre crop) through that decoder choice; ``all-<decoder>-crop`` and
``all-<decoder>-scale`` every frame in order (the frame cache's read, with and without the crop);
``timeline-<fps>`` the timeline at that rate (times and crops). A value is the sha256 of the
crops' bytes, with what else the path returns, or the error a path raises for that clip.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tests.conftest import EXAMPLES
from vtplatform.video.reader import (
    BadVideo,
    ReadOptions,
    infer_plan,
    iter_all_frames,
    iter_timeline,
    read_frames,
    read_frames_and_timeline,
)
from vtplatform.video.transforms import scale, scale_and_crop

DIGESTS = Path(__file__).with_name("crop_digests.json")
CLIPS = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in {".mp4", ".mkv", ".avi", ".mov"})
READS = {
    "read-auto": ReadOptions(),
    "read-decord": ReadOptions(decoder="decord"),
    "read-pyav": ReadOptions(decoder="pyav"),
    "read-pyav-stream": ReadOptions(decord_max_frames=0),  # PyAV's one pass (since 2026-12: also read-auto's)
}
ALL = {"all-decord": ReadOptions(decoder="decord"), "all-pyav": ReadOptions(decoder="pyav")}
TIMELINE_FPS = (1.0, 7.0)


def _sha(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _failure(exc: Exception) -> dict:
    return {"error": f"{type(exc).__name__}/{getattr(exc, 'error_type', '')}"}


def path_digest(clip: str, path: str) -> dict:
    """The digest of one reader path on one bundled clip."""
    file = str(EXAMPLES / clip)
    try:
        if path in READS:
            out = read_frames(file, *infer_plan(300), READS[path])
            return {
                "sha256": _sha([out.frames]),
                "decoder": out.decoder,
                "num_frames": out.num_frames,
                "indices": _sha([out.indices]),
                "size": [out.width, out.height],
            }
        if path.startswith("all-"):
            name, _, transform = path.rpartition("-")
            info, frames = iter_all_frames(file, scale_and_crop if transform == "crop" else scale, ALL[name])
            crops = list(frames)
            return {"sha256": _sha(crops), "decoder": info.decoder, "count": len(crops)}
        if path.startswith("timeline-"):
            info, frames = iter_timeline(file, float(path.split("-")[1]), scale_and_crop, ReadOptions())
            items = list(frames)
            return {
                "sha256": _sha([f for _, f in items]),
                "times": _sha([np.array([t for t, _ in items], np.float64)]),
                "count": len(items),
                "end_s": info.end_s,
            }
    except BadVideo as exc:
        return _failure(exc)
    raise ValueError(f"unknown path {path}")


def one_pass_digests(clip: str, read: str, fps: float, hold_frames: int = 512) -> tuple[dict, dict]:
    """``read_frames_and_timeline`` with the options of ``read`` (a ``READS`` key): the digests of
    its samples and of its timeline, in the form of ``read`` and ``timeline-<fps>``."""
    file = str(EXAMPLES / clip)
    try:
        info, frames = read_frames_and_timeline(file, *infer_plan(300), fps, READS[read], hold_frames)
        items = list(frames)
    except BadVideo as exc:
        return _failure(exc), _failure(exc)
    out = info.sampled
    sampled = {
        "sha256": _sha([out.frames]),
        "decoder": out.decoder,
        "num_frames": out.num_frames,
        "indices": _sha([out.indices]),
        "size": [out.width, out.height],
    }
    timeline = {
        "sha256": _sha([f for _, f in items]),
        "times": _sha([np.array([t for t, _ in items], np.float64)]),
        "count": len(items),
        "end_s": info.end_s,
    }
    return sampled, timeline


PATHS = [*READS, *(f"{a}-{t}" for a in ALL for t in ("crop", "scale")), *(f"timeline-{f:g}" for f in TIMELINE_FPS)]


def main() -> None:
    digests = {f"{clip}/{path}": path_digest(clip, path) for clip in CLIPS for path in PATHS}
    DIGESTS.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"{len(digests)} digests -> {DIGESTS}")


if __name__ == "__main__":
    main()
