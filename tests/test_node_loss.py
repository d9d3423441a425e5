"""Losing a node mid-job, as a spot instance is lost: a multi-node cluster on loopback (a head that
runs no tasks and two 1-CPU worker nodes, no more CPUs than this machine has), one worker node
SIGKILLed with everything on it, and a replacement node added."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import EXAMPLES, ROOT
from tests.ray_nodes import Node, kill_later, pids_named, start_cluster, survivors
from tests.synthetic_features import make_videos, write_feature_table, write_list
from tests.train.kills import assert_resumed, on_disk, registered, registered_after, resumed_in
from vtplatform import schema as S
from vtplatform.config import load_config
from vtplatform.models import weights as W
from vtplatform.storage import derive_video_id
from vtplatform.train.lstm import run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def started():
    c = start_cluster(head_cpus=0)
    try:
        for n in (1, 2):  # one at a time: two raylets starting at once on 2 cores can time out
            c.add_worker(num_cpus=1)
            c.wait_for_cpus(n)
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster(started):
    """The module's cluster with two live 1-CPU worker nodes: a test that lost one left its
    replacement, which must have joined before the next test starts (launched again if it failed to
    start: on 2 busy cores, its raylet can time out while the cluster recovers)."""
    started.wait_for_cpus(2, timeout=240, relaunch=2)
    return started


def node_running(cluster, title: str) -> Node:
    """The worker node that hosts a process titled ``title``; a failure when none does (killing an
    idle node would test nothing)."""
    hosts = [n for n in cluster.workers if n.proc.poll() is None and pids_named(title, under=n.proc.pid)]
    assert hosts, f"no worker node runs a {title} process: nothing for the lost node to take down"
    return hosts[0]


def lose_a_node(cluster, title: str, progress):
    """A kill: the node hosting ``title`` stops at once with everything on it (its processes,
    counted), ``progress()`` says how far the job was at that moment, the node dies, and a
    replacement node is added."""

    def kill() -> tuple[int, object]:
        node = node_running(cluster, title)
        frozen = node.freeze()
        at_kill = progress()
        node.kill()
        assert not survivors(frozen), f"processes of the lost node live on: {survivors(frozen)}"
        lost = len(frozen) - 1  # its processes below `ray start`
        cluster.add_worker(num_cpus=1)  # the autoscaler's replacement
        return lost, at_kill

    return kill


def run(command: list[str], cluster) -> subprocess.Popen:
    """A job's driver on this machine, joining the cluster (as `ray job submit` runs it on the head)."""
    env = {**os.environ, "RAY_ADDRESS": cluster.gcs, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_extraction_finishes_with_one_row_per_video_after_losing_a_node(cluster, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    names = ["mmaction2_demo.mp4", "paddlevideo_example.avi", "decord_flipping_a_pancake.mkv", "mmaction2_test.mp4"]
    paths = []
    for i in range(3):
        for name in names:
            paths.append(lib / f"{i}_{name}")
            shutil.copy(EXAMPLES / name, paths[-1])
    (tmp_path / "m.list").write_text("".join(f"{p}\n" for p in paths))
    out = tmp_path / "out"
    # one video a decode task (TSN takes a row a call): rows reach storage as they are done, while
    # the TSN actor has videos left
    overrides = ["MODEL.num_layers=18", "INFER.seg_num=8", "output.rows_per_file=2"]
    overrides += ["resources.decode_batch_size=1"]
    command = [sys.executable, "jobs/extract.py", "--config", "configs/tsn.yaml", "--filelist", str(tmp_path / "m.list"),
               "--save_dir", str(out), *[a for o in overrides for a in ("-o", o)]]  # fmt: skip
    job = run(command, cluster)

    def rows() -> int:  # the videos in OUT/features so far
        return sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "features").glob("part-*.parquet"))

    killer = kill_later(lambda: rows() > 0, lose_a_node(cluster, "MapWorker", rows), what="the TSN actor's node")
    stdout, stderr = job.communicate(timeout=900)
    lost, rows_at_kill = killer.landed()
    # the node held the TSN actor (and more), and videos remained to be done
    assert lost > 0 and 0 < rows_at_kill < len(paths), (lost, rows_at_kill, killer.replay)
    assert job.returncode == 0, f"{killer.replay}\n{stderr[-4000:]}"
    ids = pq.read_table(out / "features").column(S.VIDEO_ID).to_pylist()
    assert sorted(ids) == sorted(derive_video_id(str(p)) for p in paths)  # one row each, no duplicates
    assert not (out / "dead_letters").exists() or pq.read_table(out / "dead_letters").num_rows == 0
    assert f"{len(paths)} ok, 0 failed" in stdout


def test_training_resumes_from_its_last_checkpoint_after_losing_a_node(ray_cluster, cluster, tmp_path):
    ids, feats, labels = make_videos(96, 40, 128, 4, seed=9)
    table = write_feature_table(tmp_path, ids, feats, rows_per_file=8)
    write_list(tmp_path / "train.list", [f"{v}.npy" for v in ids[:80]], labels[:80])
    overrides = ["MODEL.num_classes=4", "MODEL.embedding_size=64", "MODEL.lstm_size=64", "MODEL.fc1_size=128"]
    overrides += ["MODEL.fc2_size=64", f"data.features={table}", f"TRAIN.filelist={tmp_path / 'train.list'}"]
    overrides += ["VALID.filelist=null", "TRAIN.batch_size=8", "TRAIN.epoch=2", "TRAIN.learning_rate=0.002"]
    overrides += ["resources.train_workers=1", "resources.train_cpus=1", "resources.train_threads=1"]
    overrides += ["train_run.checkpoint_every_steps=3", "train_run.keep_checkpoints=20", "resources.use_gpu=false"]
    config_file = ROOT / "configs" / "attention_lstm-single.yaml"

    run_train(load_config(config_file, overrides), str(tmp_path / "plain"))  # on the test session's Ray
    command = [sys.executable, "jobs/train.py", "--model_name=AttentionLSTM", "--config", str(config_file)]
    command += ["--save_dir", str(tmp_path / "lost"), *[a for o in overrides for a in ("-o", o)]]
    job = run(command, cluster)
    lost_run = tmp_path / "lost" / "AttentionLSTM"
    done = lambda: (on_disk(lost_run), registered(lost_run))  # noqa: E731
    killer = kill_later(
        registered_after(lost_run, "epoch_000_step_0000003"),
        lose_a_node(cluster, "RayTrainWorker", done),
        what="the training worker's node",
    )
    _, stderr = job.communicate(timeout=900)
    lost, (at_kill, known) = killer.landed()
    assert lost > 0, killer.replay
    assert job.returncode == 0, f"{killer.replay}\n{stderr[-4000:]}"
    resumed = resumed_in(stderr)
    assert_resumed(lost_run, resumed, at_kill, known, killer.at, "epoch_002_step_0000000", killer.replay)
    last = sorted((tmp_path / "lost" / "AttentionLSTM").glob("epoch_*"))[-1]
    plain = W.read_state(tmp_path / "plain" / "AttentionLSTM" / last.name / "model.pdparams")
    assert last.name == "epoch_002_step_0000000"
    for key, value in W.read_state(last / "model.pdparams").items():
        np.testing.assert_allclose(value, plain[key], rtol=0, atol=1e-6, err_msg=key)
    meta = json.loads((last / "meta.json").read_text())
    assert meta["global_step"] == 20
