"""Every reader path gives, byte for byte, the crops it gave before the reader was made faster:
the sha256 of each path's crops for each bundled clip, against ``crop_digests.json`` (recorded by
``tests/video/crop_digests.py`` on the reader as it was). A single changed byte fails.

Extraction's reads and the 1 frame/s timeline of the small clips run in the fast suite; the
every-frame reads, the 7 frames/s timeline and the 720p/1080p clips are ``slow``."""

from __future__ import annotations

import json

import pytest

from tests.video.crop_digests import CLIPS, DIGESTS, PATHS, path_digest

RECORDED = json.loads(DIGESTS.read_text())
HEAVY_CLIPS = {"mmaction2_demo_skeleton_1080p.mp4", "decord_corrupted.mp4"}
FAST_PATHS = [p for p in PATHS if p.startswith("read-") or p == "timeline-1"]


def test_every_clip_and_path_is_recorded():
    assert sorted(RECORDED) == sorted(f"{clip}/{path}" for clip in CLIPS for path in PATHS)
    assert len(CLIPS) == 16 and len(PATHS) == 10


def _check(clip: str, paths: list[str]) -> None:
    got = {path: path_digest(clip, path) for path in paths}
    assert got == {path: RECORDED[f"{clip}/{path}"] for path in paths}


@pytest.mark.parametrize("clip", [c for c in CLIPS if c not in HEAVY_CLIPS])
def test_extraction_reads_are_byte_identical(clip):
    _check(clip, FAST_PATHS)


@pytest.mark.slow
@pytest.mark.parametrize("clip", CLIPS)
def test_every_path_is_byte_identical(clip):
    _check(clip, PATHS if clip in HEAVY_CLIPS else [p for p in PATHS if p not in FAST_PATHS])
