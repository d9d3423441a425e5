"""A real Ray cluster: `ray start --head` on loopback, then `ray job submit --working-dir .`."""

from __future__ import annotations

import os
import subprocess

import pyarrow.parquet as pq
import pytest

from tests.conftest import EXAMPLES, ROOT
from tests.ray_nodes import RAY, start_cluster
from vtplatform import schema as S
from vtplatform.storage import derive_video_id


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A head node of its own (own ports, own temp dir, the machine's CPUs) so that stopping it
    leaves every other Ray alone."""
    cluster = start_cluster()
    try:
        yield cluster.dashboard
    finally:
        cluster.stop()


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


def test_ray_job_submit_tag(head_node, tmp_path):
    """Tagging on the same real cluster through `ray job submit` (the nightly runs as a job on a
    `ray start` cluster in tests/test_user_world.py)."""
    import json
    import shutil

    from vtplatform.models import weights as W
    from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map

    lstm = build_model(AttentionLSTMConfig(512, 16, 8, 16, 8, 5), seed=1)
    W.save_state(lstm, fluid_name_map(lstm), tmp_path / "lstm.pdparams")
    lib = tmp_path / "lib"
    lib.mkdir()
    clips = [
        "mmaction2_demo.mp4",
        "mmaction2_test.mp4",
        "paddlevideo_example.avi",
        "mmaction2_part_0.mp4",
        "decord_flipping_a_pancake.mkv",
    ]
    for name in clips:
        shutil.copy(EXAMPLES / name, lib / name)
    small = [
        "MODEL.num_layers=18",
        "INFER.seg_num=4",
        "MODEL.feature_dims=[512]",
        "MODEL.embedding_size=16",
        "MODEL.lstm_size=8",
    ]
    small += [
        "MODEL.fc1_size=16",
        "MODEL.fc2_size=8",
        "MODEL.num_classes=5",
        "MODEL.topk=3",
        "tag.topk=3",
        "resources.tsn_threads=1",
    ]
    small += ["resources.tsn_actors=1", "tag.label_file=null"]
    overrides = [a for o in small for a in ("-o", o)]

    res = submit(head_node, "jobs/tag.py", "--config", "configs/tag.yaml", "--filelist", str(lib), "--save_dir", str(tmp_path / "tags"),
                 "--lstm_weights", str(tmp_path / "lstm.pdparams"), "--format", "json,hub", *overrides)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "tagging summary" in res.stdout and f"{len(clips)} ok, 0 failed" in res.stdout
    assert pq.read_table(tmp_path / "tags" / "tags").num_rows == len(clips)
    assert len(json.loads((tmp_path / "tags" / "hub_results.json").read_text())) == len(clips)
