"""Extraction and tagging with the manifest, the videos and the output on S3 (a moto server on loopback)."""

import shutil

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import EXAMPLES, FAKE_KEY_ID, FAKE_SECRET, run_job
from vtplatform import schema as S
from vtplatform.storage import derive_video_id

SMALL = ["MODEL.num_layers=18", "INFER.seg_num=3", "resources.tsn_threads=1", "output.rows_per_file=2"]
CLIPS = ["mmaction2_demo.mp4", "paddlevideo_example.avi", "decord_rotation_0.mov"]


def _fs(endpoint):
    return pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1")


@pytest.fixture
def s3_library(moto_endpoint, s3_bucket, tmp_path):
    fs = _fs(moto_endpoint)
    for name in CLIPS:
        with open(EXAMPLES / name, "rb") as src, fs.open_output_stream(f"{s3_bucket}/videos/{name}") as dst:
            shutil.copyfileobj(src, dst)
    uris = [f"s3://{s3_bucket}/videos/{n}" for n in CLIPS] + [f"s3://{s3_bucket}/videos/missing.mp4"]
    with fs.open_output_stream(f"{s3_bucket}/lists/videos.list") as f:
        f.write(("\n".join(uris) + "\n").encode())
    return uris


def _check_outputs(endpoint, bucket, prefix, uris):
    import s3fs  # an independent S3 client reads what pyarrow wrote

    fs = s3fs.S3FileSystem(
        key=FAKE_KEY_ID, secret=FAKE_SECRET, client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"}
    )
    table = pq.read_table(f"{bucket}/{prefix}/features", filesystem=fs)
    assert sorted(table.column(S.VIDEO_ID).to_pylist()) == sorted(derive_video_id(u) for u in uris[:3])
    assert sorted(table.column(S.URI).to_pylist()) == sorted(uris[:3])
    assert table.column(S.FEATURES).combine_chunks().to_numpy_ndarray().shape == (3, 3, 512)
    dead = pq.read_table(f"{bucket}/{prefix}/dead_letters", filesystem=fs).to_pylist()
    assert [(d[S.URI], d[S.STAGE], d[S.ERROR_TYPE]) for d in dead] == [(uris[3], "read", "FileNotFoundError")]
    objects = [
        p for p, info in fs.find(f"{bucket}/{prefix}", detail=True).items() if info["type"] == "file" and info["size"]
    ]
    assert any(p.endswith(".json") for p in objects)  # the run summary
    everything = b"".join(fs.cat(p) for p in objects)
    assert FAKE_SECRET.encode() not in everything and FAKE_KEY_ID.encode() not in everything
    return table


def test_s3_manifest_videos_and_output_via_config_endpoint(ray_cluster, moto_endpoint, s3_bucket, s3_library):
    args = [
        "--config",
        "configs/tsn.yaml",
        "--filelist",
        f"s3://{s3_bucket}/lists/videos.list",
        "--save_dir",
        f"s3://{s3_bucket}/out",
    ]
    overrides = [a for o in [*SMALL, f"storage.endpoint_url={moto_endpoint}"] for a in ("-o", o)]
    res = run_job("extract.py", *args, *overrides, env={"RAY_ADDRESS": ray_cluster, "VTP_LOG_LEVEL": "DEBUG"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 ok, 1 failed" in res.stdout
    for secret in (FAKE_SECRET, FAKE_KEY_ID):
        assert secret not in res.stdout and secret not in res.stderr
    _check_outputs(moto_endpoint, s3_bucket, "out", s3_library)

    again = run_job("extract.py", *args, *overrides, env={"RAY_ADDRESS": ray_cluster})
    assert again.returncode == 0 and "skipped (done before) 4" in again.stdout


def test_s3_endpoint_from_aws_endpoint_url(ray_cluster, moto_endpoint, s3_bucket, s3_library):
    """The standard variable reaches the Ray workers too (they do not inherit the driver's environment)."""
    args = [
        "--config",
        "configs/tsn.yaml",
        "--filelist",
        f"s3://{s3_bucket}/lists/videos.list",
        "--save_dir",
        f"s3://{s3_bucket}/env-out",
    ]
    overrides = [a for o in SMALL for a in ("-o", o)]
    res = run_job("extract.py", *args, *overrides, env={"RAY_ADDRESS": ray_cluster, "AWS_ENDPOINT_URL": moto_endpoint})
    assert res.returncode == 0, res.stderr[-3000:]
    _check_outputs(moto_endpoint, s3_bucket, "env-out", s3_library)


def test_missing_bucket_and_manifest_are_configuration_errors(ray_cluster, moto_endpoint, s3_bucket):
    base = [
        "--config",
        "configs/tsn.yaml",
        "-o",
        f"storage.endpoint_url={moto_endpoint}",
        *[a for o in SMALL for a in ("-o", o)],
    ]
    res = run_job(
        "extract.py",
        *base,
        "--filelist",
        f"s3://{s3_bucket}/nope.list",
        "--save_dir",
        "s3://no-such-bucket-vtp/out",
        env={"RAY_ADDRESS": ray_cluster},
    )
    assert res.returncode == 2 and "cannot write to s3://no-such-bucket-vtp/out" in res.stderr
    res = run_job(
        "extract.py",
        *base,
        "--filelist",
        f"s3://{s3_bucket}/nope.list",
        "--save_dir",
        f"s3://{s3_bucket}/out",
        env={"RAY_ADDRESS": ray_cluster},
    )
    assert res.returncode == 2 and "manifest not found" in res.stderr
    assert FAKE_SECRET not in res.stderr


def test_a_prefix_or_glob_of_more_than_a_page_of_keys_is_listed_page_by_page(moto_endpoint, s3_bucket):
    """1,050 videos (S3 lists 1,000 keys a page) plus other files under a prefix: every video once,
    with the size the listing gave, and nothing else."""
    import concurrent.futures

    from vtplatform.config import StorageSection
    from vtplatform.manifest import read_manifest

    fs = _fs(moto_endpoint)
    keys = [f"lib/{'a' if i % 2 else 'b'}/clip {i:04d}.mp4" for i in range(1050)] + ["lib/notes.txt", "lib/a/x.json"]

    def put(key: str) -> None:
        with fs.open_output_stream(f"{s3_bucket}/{key}") as f:
            f.write(b"v" * (len(key) + 7))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, keys))
    storage = StorageSection(endpoint_url=moto_endpoint)
    listed = read_manifest(f"s3://{s3_bucket}/lib/", storage).entries
    videos = sorted(f"s3://{s3_bucket}/{k}" for k in keys if k.endswith(".mp4"))
    assert listed.column(S.URI).to_pylist() == videos
    assert listed.column(S.SIZE_BYTES).to_pylist() == [len(u.split("/", 3)[3]) + 7 for u in videos]
    globbed = read_manifest(f"s3://{s3_bucket}/lib/a/*.mp4", storage).entries
    assert globbed.num_rows == 525 and all("/lib/a/" in u for u in globbed.column(S.URI).to_pylist())


def test_s3_tagging_with_segments_and_thumbnails(ray_cluster, moto_endpoint, s3_bucket, s3_library, tmp_path):
    """`jobs/tag.py --segments --thumbnails` reading videos from S3 and writing every table there."""
    import s3fs

    from vtplatform.models import weights as W
    from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map

    model = build_model(AttentionLSTMConfig(512, 8, 8, 16, 8, 4), seed=3)
    W.save_state(model, fluid_name_map(model), tmp_path / "lstm.pdparams")
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\n")
    args = ["--config", "configs/tag.yaml", "--filelist", f"s3://{s3_bucket}/lists/videos.list",
            "--save_dir", f"s3://{s3_bucket}/tags", "--lstm_weights", str(tmp_path / "lstm.pdparams"),
            "--label_file", str(tmp_path / "names.txt"), "--segments", "3", "--thumbnails"]  # fmt: skip
    sizes = ["MODEL.feature_dims=[512]", "MODEL.embedding_size=8", "MODEL.lstm_size=8", "MODEL.fc1_size=16"]
    sizes += ["MODEL.fc2_size=8", "MODEL.num_classes=4", "tag.threshold=0.0", f"storage.endpoint_url={moto_endpoint}"]
    res = run_job("tag.py", *args, *[a for o in [*SMALL, *sizes] for a in ("-o", o)], env={"RAY_ADDRESS": ray_cluster})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 ok, 1 failed" in res.stdout

    fs = s3fs.S3FileSystem(
        key=FAKE_KEY_ID, secret=FAKE_SECRET, client_kwargs={"endpoint_url": moto_endpoint, "region_name": "us-east-1"}
    )
    ids = sorted(derive_video_id(u) for u in s3_library[:3])
    segments = pq.read_table(f"{s3_bucket}/tags/{S.SEGMENTS_DIR}", filesystem=fs)
    assert sorted(set(segments.column(S.VIDEO_ID).to_pylist())) == ids
    for vid in ids:  # windows 0, 1, ... once each, every 3 s
        mine = segments.filter(pc.equal(segments.column(S.VIDEO_ID), vid)).sort_by(S.WINDOW)
        assert mine.column(S.WINDOW).to_pylist() == list(range(mine.num_rows))
        assert mine.column(S.START_S).to_pylist() == [3.0 * k for k in range(mine.num_rows)]
        assert fs.size(f"{s3_bucket}/tags/{S.THUMBNAILS_DIR}/{vid}/{mine.num_rows - 1:05d}.jpg") > 0
    spans = pq.read_table(f"{s3_bucket}/tags/{S.SPANS_DIR}", filesystem=fs)
    assert sorted(set(spans.column(S.VIDEO_ID).to_pylist())) == ids  # threshold 0: every class spans each video
    assert spans.num_rows == 4 * len(ids)
