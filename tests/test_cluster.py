"""A real Ray cluster: `ray start --head` on loopback, then `ray job submit --working-dir .`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import EXAMPLES, ROOT, _free_port
from vtplatform import schema as S
from vtplatform.storage import derive_video_id

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A head node of its own (own ports, own temp dir) so that stopping it leaves every other Ray alone."""
    port, dashboard = _free_port(), _free_port()
    temp_dir = tmp_path_factory.mktemp("ray-head")
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--dashboard-port={dashboard}",
    ]
    cmd += ["--dashboard-host=127.0.0.1", "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={temp_dir}"]
    # The cluster's `python` is this environment's, as on a node built from the project's image.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except Exception:
            if head.poll() is not None or time.time() > deadline:
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail("the Ray head node did not start")
            time.sleep(1)
    try:
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def submit(address: str, *job_args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", f"--address={address}", "--working-dir", ".", "--", "python", *job_args]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_extract(head_node, tmp_path):
    clips = [EXAMPLES / "mmaction2_demo.mp4", EXAMPLES / "paddlevideo_example.avi", tmp_path / "missing.mp4"]
    (tmp_path / "m.list").write_text("\n".join(map(str, clips)) + "\n")
    out = tmp_path / "out"
    res = submit(
        head_node,
        "jobs/extract.py",
        "--config", "configs/tsn.yaml",
        "--filelist", str(tmp_path / "m.list"),
        "--save_dir", str(out),
        "-o", "MODEL.num_layers=18", "-o", "INFER.seg_num=4", "-o", "resources.tsn_threads=1",
    )  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "succeeded" in res.stdout and "2 ok, 1 failed" in res.stdout
    table = pq.read_table(out / "features")
    assert sorted(table.column(S.VIDEO_ID).to_pylist()) == sorted(derive_video_id(str(c)) for c in clips[:2])
    assert table.column(S.FEATURES).combine_chunks().to_numpy_ndarray().shape == (2, 4, 512)
    dead = pq.read_table(out / "dead_letters").to_pylist()
    assert [(d[S.STAGE], d[S.ERROR_TYPE]) for d in dead] == [("read", "FileNotFoundError")]
