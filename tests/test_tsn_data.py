"""TSN data: the seed's lists and frames layout, per-epoch plans, and sample loading from videos,
image folders and the frame cache (without Ray; the Ray paths are in test_frame_cache.py)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from PIL import Image

from tests.clips import write_indexed_clip
from tests.conftest import SEED
from vtplatform import schema as S
from vtplatform.config import ConfigError, load_config
from vtplatform.frame_cache import CacheTask, cache_settings, write_shard
from vtplatform.outputs.frame_cache import read_index
from vtplatform.tsn_data import (
    attach_cache,
    clip_frames,
    clip_spec,
    load_clips,
    read_list,
    train_samples,
)
from vtplatform.video.reader import ReadOptions

TSN_YAML = SEED / "configs" / "tsn.yaml"
SMALL = ["TRAIN.short_size=128", "TRAIN.target_size=112", "VALID.short_size=128", "VALID.target_size=112"]
SMALL += [
    "TEST.short_size=128",
    "TEST.target_size=112",
    "INFER.short_size=128",
    "INFER.target_size=112",
    "INFER.seg_num=5",
]


def _config(*overrides):
    return load_config(TSN_YAML, [*SMALL, *overrides])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """60 frames; frame i is 4 * i grey on its left half and black on its right half (i < 64)."""
    return write_indexed_clip(tmp_path_factory.mktemp("tsn_data") / "indexed.mp4", 60)


def _plan(uri, label=1, epoch=0, video_id="vid"):
    row = {S.VIDEO_ID: video_id, S.URI: str(uri), S.LABEL: label, S.NUM_FRAMES: -1, S.EPOCH: epoch}
    row |= {S.SHARD: None, S.FIRST_ROW_GROUP: -1, S.POOL_SIZE: -1, S.HEIGHT: -1, S.WIDTH: -1}
    return pa.Table.from_pylist([row], schema=S.SAMPLE_SCHEMA)


def _ordinals(frames):
    """The ordinal each (cropped, maybe flipped) indexed frame shows: its brightest half is 4 * i."""
    return [round(float(np.percentile(f, 99)) / 4) for f in frames]


def test_seed_tsn_lists_load_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config()
    for name in ("train", "val", "test"):
        videos = read_list(str(SEED / "lists" / f"dataset__tsn__{name}.list.example"), config)
        lines = (SEED / "lists" / f"dataset__tsn__{name}.list.example").read_text().split()
        assert videos.entries.column(S.URI).to_pylist() == [str(tmp_path / p) for p in lines[0::2]]
        assert videos.entries.column(S.LABEL).to_pylist() == [int(v) for v in lines[1::2]]
    infer = read_list(str(SEED / "lists" / "dataset__tsn__infer.list.example"), config, labelled=False)
    assert set(infer.entries.column(S.LABEL).to_pylist()) == {-1}
    with pytest.raises(ConfigError, match="no usable labelled videos"):
        read_list(str(SEED / "lists" / "dataset__tsn__infer.list.example"), config)


def test_entries_need_exactly_one_label_in_range(tmp_path):
    lst = tmp_path / "train.list"
    lst.write_text("/v/a.mp4 1\n/v/b.mp4\n/v/c.mp4 1 2\n/v/d.mp4 x\n/v/e.mp4 3\n/v/a.mp4 1\n/v/f\x00.mp4 1\n")
    videos = read_list(str(lst), _config("MODEL.num_classes=3"))
    assert videos.entries.column(S.URI).to_pylist() == ["/v/a.mp4"]
    assert videos.duplicates == 1
    reasons = sorted((r[S.ERROR_TYPE], r[S.URI]) for r in videos.rejected)
    assert reasons == [
        ("BadLabel", "/v/b.mp4"),
        ("BadLabel", "/v/c.mp4"),
        ("BadLabel", "/v/d.mp4 x"),  # "x" is no label: the path is "/v/d.mp4 x", without a label
        ("BadLabel", "/v/e.mp4"),
        ("ManifestParseError", "/v/f\x00.mp4 1"),
    ]
    messages = " ".join(r[S.MESSAGE] for r in videos.rejected)
    assert "exactly one integer label, got 0" in messages and "got 2" in messages
    assert "label 3 is out of range for MODEL.num_classes=3" in messages


def test_tsn_list_names_with_spaces_and_unicode(tmp_path):
    lst = tmp_path / "train.list"
    lst.write_text("/lib/видео 测试 clip.mp4 2\n/lib/a  b.mp4\t1\n/lib/2019 0\n/lib/take -1 1\n", encoding="utf-8")
    videos = read_list(str(lst), _config("MODEL.num_classes=3"))
    uris = ["/lib/видео 测试 clip.mp4", "/lib/a  b.mp4", "/lib/2019", "/lib/take -1"]
    assert videos.entries.column(S.URI).to_pylist() == uris
    assert videos.entries.column(S.LABEL).to_pylist() == [2, 1, 0, 1]
    assert not videos.rejected


def test_frames_lists(tmp_path):
    lst = tmp_path / "frames.list"
    lst.write_text(
        "/f/a 30 2\n/f/b 0 1\n/f/c twelve 1\n/f/d 12 1\n/f/видео 测试  dir 40 1\n/f/tab\tdir\t7\t0\n/f/e\n/f/g\x00 3 1\n",
        encoding="utf-8",
    )
    videos = read_list(str(lst), _config("MODEL.format=frames"))
    assert videos.entries.column(S.URI).to_pylist() == ["/f/a", "/f/d", "/f/видео 测试  dir", "/f/tab\tdir"]
    assert videos.entries.column(S.NUM_FRAMES).to_pylist() == [30, 12, 40, 7]
    assert videos.entries.column(S.LABEL).to_pylist() == [2, 1, 1, 0]
    rejected = sorted((r[S.ERROR_TYPE], r[S.URI]) for r in videos.rejected)
    assert rejected == [
        ("BadLabel", "/f/c twelve"),  # DIR "/f/c twelve", 1 frame, no label
        ("ManifestParseError", "/f/b 0 1"),  # 0 frames
        ("ManifestParseError", "/f/e"),  # no NUM_FRAMES
        ("ManifestParseError", "/f/g\x00 3 1"),
    ]


def _entries(n):
    return pa.Table.from_pylist(
        [_plan(f"/v/{i}.mp4", video_id=f"v{i}").to_pylist()[0] for i in range(n)], schema=_plan("x").schema
    )


def test_train_plan_shuffles_per_epoch_and_deals_equal_disjoint_shares():
    entries = _entries(23)
    plans = [train_samples(entries, range(0, 3), seed=5, rank=r, world_size=2, batch_size=4) for r in range(2)]
    for plan in plans:
        assert plan.num_rows == 3 * 8  # (23 // 2) // 4 = 2 batches of 4 per epoch
        assert plan.column(S.EPOCH).to_pylist() == [0] * 8 + [1] * 8 + [2] * 8
    for epoch in range(3):
        shares = [set(p.filter(pa.compute.equal(p[S.EPOCH], epoch)).column(S.VIDEO_ID).to_pylist()) for p in plans]
        assert len(shares[0]) == len(shares[1]) == 8 and not shares[0] & shares[1]
    orders = [plans[0].column(S.VIDEO_ID).to_pylist()[8 * e : 8 * e + 8] for e in range(3)]
    assert orders[0] != orders[1] != orders[2]
    again = train_samples(entries, range(0, 3), seed=5, rank=0, world_size=2, batch_size=4)
    assert again.equals(plans[0])
    resumed = train_samples(entries, range(1, 3), seed=5, rank=0, world_size=2, batch_size=4, skip_steps=1)
    assert resumed.column(S.VIDEO_ID).to_pylist() == plans[0].column(S.VIDEO_ID).to_pylist()[12:]
    with pytest.raises(ConfigError, match="cannot fill one batch"):
        train_samples(_entries(7), range(1), 0, 0, 2, 4)


def test_training_samples_follow_the_videotag_rule(indexed):
    spec = clip_spec(_config(), "train", seed=3)
    out = load_clips(_plan(indexed, epoch=0), spec)
    assert out.column(S.ERROR_TYPE).to_pylist() == [None]
    frames = clip_frames(out, 3, 112)[0]
    indices = out.column(S.FRAME_INDICES).to_pylist()[0]
    assert [i // 20 for i in indices] == [0, 1, 2]  # one random frame inside each of the 3 segments
    assert _ordinals(frames) == indices  # and it is that decoded frame
    assert out.column(S.LABEL).to_pylist() == [1]
    again = load_clips(_plan(indexed, epoch=0), spec)
    assert again.drop_columns(["load_seconds"]).equals(
        out.drop_columns(["load_seconds"])
    )  # (seed, epoch, video) decide it all
    epochs = {tuple(load_clips(_plan(indexed, epoch=e), spec).column(S.FRAME_INDICES).to_pylist()[0]) for e in range(8)}
    assert len(epochs) > 4


def test_evaluation_samples_are_centred(indexed):
    config = _config()
    valid = load_clips(_plan(indexed), clip_spec(config, "valid", seed=0))
    assert valid.column(S.FRAME_INDICES).to_pylist()[0] == [9, 29, 49]
    test = load_clips(_plan(indexed), clip_spec(config, "test", seed=0))
    assert test.column(S.FRAME_INDICES).to_pylist()[0] == [3, 11, 19, 27, 35, 43, 51]
    assert _ordinals(clip_frames(test, 7, 112)[0]) == [3, 11, 19, 27, 35, 43, 51]
    infer = load_clips(_plan(indexed), clip_spec(config, "infer", seed=0))
    assert infer.column(S.FRAME_INDICES).to_pylist()[0] == [5, 17, 29, 41, 53]  # INFER.seg_num=5


def test_bad_inputs_become_error_rows(tmp_path, indexed):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00junk" * 500)
    plan = pa.concat_tables(
        [_plan(tmp_path / "missing.mp4", video_id="a"), _plan(junk, video_id="b"), _plan(indexed, video_id="c")]
    )
    out = load_clips(plan, clip_spec(_config(), "train", seed=0))
    assert out.column(S.STAGE).to_pylist() == ["read", "decode", None]
    assert out.column(S.ERROR_TYPE).to_pylist()[0] == "FileNotFoundError"
    assert out.column(S.FRAMES).to_pylist()[:2] == [None, None]


def _write_frames_dir(folder: Path, n: int, size=(160, 120)) -> Path:
    """The seed's layout: img_00001.jpg ... (1-based), frame i shows 4 * i grey on its left half."""
    from tests.clips import indexed_frame

    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(indexed_frame(i, *size)).save(folder / f"img_{i + 1:05d}.jpg", quality=95)
    return folder


def test_seed_frames_layout_trains_and_evaluates(tmp_path):
    config = _config("MODEL.format=frames")
    folder = _write_frames_dir(tmp_path / "video_a", 30)
    lst = tmp_path / "frames.list"
    lst.write_text(f"{folder} 30 2\n{tmp_path / 'video_b'} 30 1\n")
    videos = read_list(str(lst), config)
    out = load_clips(videos.entries, clip_spec(config, "train", seed=1))
    assert out.column(S.STAGE).to_pylist() == [None, "read"]  # video_b has no images
    indices = out.column(S.FRAME_INDICES).to_pylist()[0]
    assert [i // 10 for i in indices] == [0, 1, 2]
    assert _ordinals(clip_frames(out.slice(0, 1), 3, 112)[0]) == indices  # img_{i+1:05d}.jpg is frame i
    test = load_clips(videos.entries.slice(0, 1), clip_spec(config, "test", seed=1))
    assert test.column(S.FRAME_INDICES).to_pylist()[0] == [1, 5, 9, 13, 17, 21, 25]


@pytest.mark.parametrize("encoding", ["uint8", "jpeg"])
@pytest.mark.parametrize("keep_frames", [None, 10])
def test_cached_samples_equal_samples_decoded_from_the_video(tmp_path, indexed, encoding, keep_frames):
    overrides = [
        f"frame_cache.encoding={encoding}",
        "frame_cache.frames_per_row_group=4",
        f"frame_cache.path={tmp_path}",
    ]
    if keep_frames:
        overrides.append(f"frame_cache.keep_frames={keep_frames}")
    config = _config(*overrides)
    settings = cache_settings(config)
    write_shard(
        _plan(indexed).select([S.VIDEO_ID, S.URI, S.LABEL]),
        CacheTask(str(tmp_path), settings, ReadOptions(), config.storage),
    )
    index = read_index(pafs.LocalFileSystem(), str(tmp_path))
    assert index.column(S.POOL_SIZE).to_pylist() == [keep_frames or 60]
    for mode in ("train", "valid", "test"):
        for epoch in range(3):
            from_video = load_clips(_plan(indexed, epoch=epoch), clip_spec(config, mode, seed=4))
            cached, hits = attach_cache(_plan(indexed, epoch=epoch), index)
            assert hits == 1
            from_cache = load_clips(cached, clip_spec(config, mode, seed=4, cache=settings))
            assert from_cache.column(S.FRAME_INDICES).equals(from_video.column(S.FRAME_INDICES))
            a, b = (np.frombuffer(t.column(S.FRAMES)[0].as_py(), np.uint8) for t in (from_video, from_cache))
            if encoding == "uint8":
                assert a.tobytes() == b.tobytes()
            else:
                assert np.abs(a.astype(int) - b).max() <= 6
    if keep_frames:  # the pool: 10 evenly spaced frames (VideoTag's centred rule), segments drawn among them
        pool = {2, 8, 14, 20, 26, 32, 38, 44, 50, 56}
        assert set(from_video.column(S.FRAME_INDICES).to_pylist()[0]) <= pool


def test_cache_settings_must_match_the_phase(tmp_path):
    settings = cache_settings(_config())
    with pytest.raises(ConfigError, match="short side 128"):
        clip_spec(_config("VALID.short_size=256", "VALID.target_size=224"), "valid", 0, cache=settings)
    with pytest.raises(ConfigError, match="keep_frames"):
        clip_spec(_config("frame_cache.keep_frames=8"), "train", 0, cache=settings)
