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


def test_ray_job_submit_tag_then_a_tiny_nightly(head_node, tmp_path):
    """Issue 5 on the same real cluster: tag a library, then run the nightly pipeline."""
    import json
    import shutil

    from vtplatform import registry as R
    from vtplatform.config import StorageSection
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

    (tmp_path / "labels.list").write_text("\n".join(f"{lib / n} {i % 5}" for i, n in enumerate(clips)) + "\n")
    (tmp_path / "holdout.list").write_text(f"{lib / clips[0]} 0\n")
    nightly = [
        *small,
        "TRAIN.epoch=1",
        "TRAIN.batch_size=2",
        "TRAIN.num_gpus=1",
        "TEST.batch_size=2",
        "train_run.num_workers=1",
    ]
    nightly += ["train_run.cpus_per_worker=1", "nightly.tsn_weights=null", "nightly.pretrain=null"]
    nightly += [
        f"nightly.library={lib}",
        f"nightly.labels={tmp_path / 'labels.list'}",
        f"nightly.holdout={tmp_path / 'holdout.list'}",
    ]
    nightly += [f"nightly.registry={tmp_path / 'registry'}"]
    res = submit(
        head_node, "jobs/nightly.py", "--config", "configs/nightly.yaml", *[a for o in nightly for a in ("-o", o)]
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "nightly summary" in res.stdout and "decision            first" in res.stdout
    champion = R.read_champion(str(tmp_path / "registry"), StorageSection())
    assert champion is not None and (tmp_path / "registry" / "runs" / champion["model_id"] / "report.md").exists()
    assert pq.read_table(tmp_path / "registry" / "tags" / "tags").num_rows == len(clips)
