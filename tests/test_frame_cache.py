"""The frame cache job on Ray Data, and training batches from it against batches from the videos."""

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.clips import write_indexed_clip
from tests.conftest import SEED, run_job
from tests.tsn_clips import write_class_clips, write_list
from vtplatform import schema as S
from vtplatform.config import ConfigError, load_config
from vtplatform.frame_cache import open_cache, run_cache
from vtplatform.train.tsn import LoadResources, stream
from vtplatform.tsn_data import attach_cache, clip_spec, read_list, train_samples

SMALL = [
    "TRAIN.short_size=64",
    "TRAIN.target_size=56",
    "VALID.short_size=64",
    "VALID.target_size=56",
    "MODEL.num_classes=3",
]
LOAD = LoadResources(cpus=1, concurrency=2, videos_per_task=2, max_retries=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_videos")
    items = write_class_clips(root / "v", 3, num_frames=20, seed=4)  # 9 clips
    items.append((write_indexed_clip(root / "v" / "indexed.mp4", 30, 96, 72), 1))
    bad = root / "v" / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x01" * 4000)
    return {
        "good": items,
        "list": write_list(root / "videos.list", [*items, (bad, 2)]),
        "good_list": write_list(root / "good.list", items),
    }


def _config(*overrides):
    return load_config(SEED / "configs" / "tsn.yaml", [*SMALL, *overrides])


def _batches(config, entries, cache=None, epochs=range(2), rank=0, world=2, batch=2):
    plan = train_samples(entries, epochs, seed=7, rank=rank, world_size=world, batch_size=batch)
    return list(stream(plan, clip_spec(config, "train", 7, cache), LOAD, batch))


def test_cache_job_indexes_good_videos_dead_letters_bad_ones_and_resumes(ray_cluster, videos, tmp_path):
    config = _config(
        "frame_cache.encoding=uint8", "frame_cache.frames_per_row_group=8", "frame_cache.videos_per_file=3"
    )
    summary = run_cache(config, str(videos["list"]), str(tmp_path / "cache"))
    assert (summary.succeeded, summary.failed) == (10, {"decode/DecodeError": 1})
    assert summary.counts[S.CACHED_FRAMES] == 9 * 20 + 30
    assert summary.counts[S.CACHED_BYTES] == (9 * 20 + 30) * 64 * 85 * 3  # raw uint8 frames of 64x85
    settings, index = open_cache(str(tmp_path / "cache"), config.storage)
    assert settings["encoding"] == "uint8" and settings["short_size"] == 64 and settings["keep_frames"] is None
    assert index.num_rows == 10 and set(index.column(S.HEIGHT).to_pylist()) == {64}
    assert set(index.column(S.WIDTH).to_pylist()) == {85}  # 96x72 -> exactly 4:3 of the short side
    # every video owns whole row groups: position p sits in group first + p // 8
    for row in index.to_pylist():
        shard = pq.ParquetFile(tmp_path / "cache" / row[S.SHARD])
        for g in range(-(-row[S.POOL_SIZE] // 8)):
            group = shard.read_row_group(row[S.FIRST_ROW_GROUP] + g)
            assert set(group.column(S.VIDEO_ID).to_pylist()) == {row[S.VIDEO_ID]}
            assert group.column(S.POSITION).to_pylist() == list(range(8 * g, min(8 * g + 8, row[S.POOL_SIZE])))
    dead = pq.read_table(tmp_path / "cache" / "dead_letters").to_pylist()
    assert [d[S.URI].rsplit("/", 1)[1] for d in dead] == ["broken.mp4"]
    again = run_cache(config, str(videos["list"]), str(tmp_path / "cache"))
    assert (again.skipped, again.submitted, again.succeeded) == (11, 0, 0)
    with pytest.raises(ConfigError, match="encoding: 'uint8' != 'jpeg'"):
        run_cache(_config(), str(videos["list"]), str(tmp_path / "cache"))


def test_training_batches_from_the_cache_equal_those_from_the_videos(ray_cluster, videos, tmp_path):
    """Same seed and config: the workers receive the same bytes, cache or video (uint8 storage)."""
    config = _config(
        "frame_cache.encoding=uint8", "frame_cache.frames_per_row_group=4", f"frame_cache.path={tmp_path / 'c'}"
    )
    run_cache(config, str(videos["good_list"]), str(tmp_path / "c"))
    entries = read_list(str(videos["good_list"]), config).entries
    settings, index = open_cache(str(tmp_path / "c"), config.storage)
    cached, hits = attach_cache(entries, index)
    assert hits == 10
    for rank in range(2):
        from_video = _batches(config, entries, rank=rank)
        from_cache = _batches(config, cached, settings, rank=rank)
        assert len(from_video) == len(from_cache) == 2 * 2  # (10 // 2) // 2 = 2 batches per epoch
        for a, b in zip(from_video, from_cache, strict=True):
            assert a.column(S.VIDEO_ID).equals(b.column(S.VIDEO_ID))
            assert a.column(S.FRAME_INDICES).equals(b.column(S.FRAME_INDICES))
            assert a.column(S.FRAMES).equals(b.column(S.FRAMES))  # byte for byte
    epoch0, epoch1 = from_video[0].column(S.FRAMES), from_video[2].column(S.FRAMES)
    assert not epoch0.equals(epoch1)  # a new epoch draws new samples


def test_cache_on_s3_through_the_job(ray_cluster, videos, moto_endpoint, s3_bucket):
    """jobs/cache_frames.py writes JPEG shards to S3; training batches read from there match the
    video batches in every sampled index and within JPEG error in every pixel."""
    import numpy as np

    cache = f"s3://{s3_bucket}/cache"
    overrides = [*SMALL, f"storage.endpoint_url={moto_endpoint}", "frame_cache.videos_per_file=5"]
    args = ["--config", str(SEED / "configs" / "tsn.yaml"), "--filelist", str(videos["list"]), "--save_dir", cache]
    res = run_job(
        "cache_frames.py", *args, *[a for o in overrides for a in ("-o", o)], env={"RAY_ADDRESS": ray_cluster}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "processed now         10 ok, 1 failed" in res.stdout and "decode/DecodeError" in res.stdout
    config = _config(f"storage.endpoint_url={moto_endpoint}", f"frame_cache.path={cache}")
    settings, index = open_cache(cache, config.storage)
    assert settings["encoding"] == "jpeg" and index.num_rows == 10
    fs = pafs.S3FileSystem(endpoint_override=moto_endpoint.split("://")[1], scheme="http", region="us-east-1")
    assert len(fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/cache/frames"))) == 2
    entries = read_list(str(videos["good_list"]), config).entries
    cached, _ = attach_cache(entries, index)
    for a, b in zip(
        _batches(config, entries, epochs=range(1)), _batches(config, cached, settings, epochs=range(1)), strict=True
    ):
        assert a.column(S.FRAME_INDICES).equals(b.column(S.FRAME_INDICES))
        for x, y in zip(a.column(S.FRAMES).to_pylist(), b.column(S.FRAMES).to_pylist(), strict=True):
            diff = np.abs(np.frombuffer(x, np.uint8).astype(int) - np.frombuffer(y, np.uint8))
            assert diff.mean() < 4.0  # JPEG error on a noise texture; the next frame or a 2-pixel shift is ~13
