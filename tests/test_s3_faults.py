"""Every job against S3 as it is at scale (issue 22): the faulty proxy of ``tests/faulty_s3.py`` in
front of moto, 10% of requests throttled (503 SlowDown), 2% reset mid-answer, 20-200 ms on each."""

from __future__ import annotations

import shutil

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tests.conftest import EXAMPLES, FAKE_KEY_ID, FAKE_SECRET, run_job
from vtplatform import schema as S
from vtplatform.storage import derive_video_id

SMALL = ["MODEL.num_layers=18", "INFER.seg_num=3", "resources.tsn_threads=1", "output.rows_per_file=2"]
CLIPS = ["mmaction2_demo.mp4", "paddlevideo_example.avi", "decord_rotation_0.mov"]


def _o(*items: str) -> list[str]:
    return [arg for item in items for arg in ("-o", item)]


def _clean(endpoint: str) -> pafs.S3FileSystem:
    """moto itself, not the proxy: what the jobs wrote, read back by a client that sees no faults."""
    return pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1")


def _faults(entries: list[dict]) -> dict[str, int]:
    out = {"slowdown": 0, "reset": 0}
    for e in entries:
        if e["fault"]:
            out[e["fault"]] += 1
    return out


def test_extract(ray_cluster, moto_endpoint, faulty_s3, s3_bucket):
    fs = _clean(moto_endpoint)
    for name in CLIPS:
        with open(EXAMPLES / name, "rb") as src, fs.open_output_stream(f"{s3_bucket}/videos/{name}") as dst:
            shutil.copyfileobj(src, dst)
    uris = [f"s3://{s3_bucket}/videos/{n}" for n in CLIPS] + [f"s3://{s3_bucket}/videos/missing.mp4"]
    with fs.open_output_stream(f"{s3_bucket}/lists/videos.list") as f:
        f.write(("\n".join(uris) + "\n").encode())
    mark = faulty_s3.mark()
    args = ["--config", "configs/tsn.yaml", "--filelist", f"s3://{s3_bucket}/lists/videos.list"]
    res = run_job(
        "extract.py", *args, "--save_dir", f"s3://{s3_bucket}/out",
        *_o(*SMALL, f"storage.endpoint_url={faulty_s3.endpoint}"), env={"RAY_ADDRESS": ray_cluster},
    )  # fmt: skip
    print(res.stdout, res.stderr[-5000:])
    assert res.returncode == 0, res.stderr[-3000:]
    print(_faults(faulty_s3.entries(mark)))
