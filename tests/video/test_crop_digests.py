"""Every reader path gives, byte for byte, the crops it gave before the reader was made faster:
the sha256 of each path's crops for each bundled clip, against ``crop_digests.json`` (recorded by
``tests/video/crop_digests.py`` on the reader as it was). A single changed byte fails.

Extraction's reads and the 1 frame/s timeline of the small clips run in the fast suite; the
every-frame reads, the 7 frames/s timeline and the 720p/1080p clips are ``slow``."""

from __future__ import annotations

import json

import pytest

from tests.video.crop_digests import CLIPS, DIGESTS, PATHS, READS, one_pass_digests, path_digest

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


def _check_one_pass(clip: str, reads: list[str], fps: float) -> None:
    for read in reads:
        sampled, timeline = one_pass_digests(clip, read, fps)
        assert sampled == RECORDED[f"{clip}/{read}"], read
        recorded = RECORDED[f"{clip}/timeline-{fps:g}"]
        if "error" in sampled:  # the file fails whole: the timeline never started
            continue
        assert timeline == recorded, read


@pytest.mark.parametrize("clip", [c for c in CLIPS if c not in HEAVY_CLIPS])
def test_one_pass_gives_the_recorded_samples_and_timeline(clip):
    """``read_frames_and_timeline`` (tagging with segments: one decode) gives ``read_frames``'s
    samples and ``iter_timeline``'s timeline, byte for byte, whichever decoder path the file takes."""
    _check_one_pass(clip, ["read-auto"], 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("clip", CLIPS)
def test_one_pass_on_every_decoder_path(clip):
    _check_one_pass(clip, list(READS) if clip not in HEAVY_CLIPS else ["read-auto", "read-pyav"], 7.0)
