"""Every job as a user runs it: `python jobs/X.py` with a shipped config (overrides for size only),
on a Ray of 1 CPU. Each must finish, or fail in seconds with a clear message; none may wait forever.
On a Ray of this machine's CPUs (the session's), the same jobs with the same shipped configs run in
their own modules (extract on tsn.yaml: test_extract.py; AttentionLSTM train and predict on
attention_lstm-single.yaml, and eval: test_lstm_jobs.py; tag on tag.yaml: test_tag.py; nightly on
nightly.yaml: test_nightly.py), and `run_job` checks every job's output for Paddle's noise; TSN's
cache, train, eval and predict on tsn-single.yaml run here in both worlds.
Also: a stale `/tmp/ray/ray_current_cluster`, a dead RAY_ADDRESS, and malformed fault hooks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import EXAMPLES, ROOT, run_job
from tests.ray_nodes import free_port, start_cluster
from tests.tsn_clips import SMALL_FRAMES, write_class_clips
from vtplatform import schema as S

CLIPS = ["mmaction2_demo.mp4", "paddlevideo_example.avi", "decord_flipping_a_pancake.mkv", "mmaction2_test.mp4"]
NAMES = ["alpha", "beta", "gamma"]
# Sizes only: ResNet-18 (512-dim features), 4 segments, a tiny AttentionLSTM over 3 classes, one epoch;
# TSN trains on 32 px crops.
EXTRACT = ["MODEL.num_layers=18", "INFER.seg_num=4"]
LSTM = ["MODEL.embedding_size=8", "MODEL.lstm_size=8", "MODEL.fc1_size=16", "MODEL.fc2_size=8", "MODEL.num_classes=3"]
LSTM += ["MODEL.feature_dims=[512]", "TRAIN.epoch=1", "TRAIN.batch_size=2", "VALID.batch_size=2", "TEST.batch_size=2"]
TSN = ["MODEL.num_layers=18", "MODEL.num_classes=3", "TRAIN.epoch=1", "TRAIN.batch_size=2", "VALID.batch_size=2"]
TSN += ["TEST.batch_size=2", "TEST.seg_num=2", "INFER.seg_num=2"]
TSN += SMALL_FRAMES
JOB_TIMEOUT = 420  # far longer than any of these takes; a hang fails the test instead of the suite


def o(*overrides: str) -> list[str]:
    return [a for item in overrides for a in ("-o", item)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    lib = root / "library"
    lib.mkdir()
    for name in CLIPS:
        shutil.copy(EXAMPLES / name, lib / name)
    paths = [lib / n for n in CLIPS]
    (root / "library.list").write_text("".join(f"{p}\n" for p in paths))
    (root / "labels.list").write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(paths)))
    (root / "holdout.list").write_text(f"{paths[0]} 0\n")
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    tsn_clips = write_class_clips(root / "tsn", per_class=2)
    (root / "tsn.list").write_text("".join(f"{p} {label}\n" for p, label in tsn_clips))
    return {"root": root, "lib": lib}


@pytest.fixture(scope="module", params=["1-cpu", "all-cpus"])
def world(request, files, tmp_path_factory):
    """Where the jobs run: RAY_ADDRESS of a `ray start` cluster with 1 CPU, or of the session's Ray,
    which has this machine's CPUs. (A job without RAY_ADDRESS starts a Ray of its own: see the
    stale-cluster test.)"""
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "all-cpus":
        yield {"env": {"RAY_ADDRESS": request.getfixturevalue("ray_cluster")}, "out": out, **files}
        return
    cluster = start_cluster(head_cpus=1)
    try:
        yield {"env": {"RAY_ADDRESS": cluster.gcs}, "out": out, **files}
    finally:
        cluster.stop()


ONE_CPU = pytest.mark.parametrize("world", ["1-cpu"], indirect=True)  # all CPUs: see the module's docstring


def job(world, script: str, *args: str) -> str:
    res = run_job(script, *args, env=world["env"], timeout=JOB_TIMEOUT)
    assert res.returncode == 0, f"{script} exited {res.returncode}:\n{res.stderr[-4000:]}"
    assert "stages on" in res.stderr or "training:" in res.stderr  # the sizes it chose are in the log
    return res.stdout  # (and no Paddle noise, from the driver or any Ray worker: run_job checks it)


@ONE_CPU
def test_extract(world):
    out = job(world, "extract.py", "--config", "configs/tsn.yaml", "--filelist", str(world["root"] / "library.list"),
              "--save_dir", str(world["out"] / "extract"), *o(*EXTRACT))  # fmt: skip
    assert f"{len(CLIPS)} ok, 0 failed" in out
    assert pq.read_table(world["out"] / "extract" / "features").num_rows == len(CLIPS)


@ONE_CPU
def test_attention_lstm_train_eval_predict(world):
    config, features, labels = (
        "configs/attention_lstm-single.yaml",
        str(world["out"] / "extract" / "features"),
        str(world["root"] / "labels.list"),
    )
    ckpt = world["out"] / "lstm"
    job(world, "train.py", "--model_name=AttentionLSTM", "--config", config, "--features", features,
        "--save_dir", str(ckpt), *o(*LSTM, f"TRAIN.filelist={labels}", f"VALID.filelist={labels}"))  # fmt: skip
    assert (ckpt / "AttentionLSTM" / "best" / "model.pdparams").exists()
    job(world, "eval.py", "--model_name=AttentionLSTM", "--config", config, "--features", features,
        "--weights", str(ckpt / "AttentionLSTM"), "--filelist", labels, "--save_dir", str(world["out"] / "lstm_eval"), *o(*LSTM))  # fmt: skip
    assert json.loads((world["out"] / "lstm_eval" / "report.json").read_text())["num_videos"] == len(CLIPS)
    job(world, "predict.py", "--model_name=AttentionLSTM", "--config", config, "--features", features,
        "--weights", str(ckpt / "AttentionLSTM"), "--label_file", str(world["root"] / "names.txt"),
        "--save_dir", str(world["out"] / "lstm_predict"), *o(*LSTM))  # fmt: skip
    table = pq.read_table(world["out"] / "lstm_predict" / "predictions")
    assert table.num_rows == len(CLIPS) and set(table.column(S.CLASS_NAMES)[0].as_py()) <= set(NAMES)


@ONE_CPU
def test_tag(world):
    """The job that hung: decode tasks, a TSN actor and an AttentionLSTM actor on 1 or 2 CPUs."""
    out = job(world, "tag.py", "--config", "configs/tag.yaml", "--filelist", str(world["root"] / "library.list"),
              "--save_dir", str(world["out"] / "tags"), "--lstm_weights", str(world["out"] / "lstm" / "AttentionLSTM"),
              *o(*EXTRACT, *LSTM, f"tag.label_file={world['root'] / 'names.txt'}", "tag.topk=3"))  # fmt: skip
    assert f"{len(CLIPS)} ok, 0 failed" in out
    tags = pq.read_table(world["out"] / "tags" / "tags")
    assert tags.num_rows == len(CLIPS) and all(len(ids) == 3 for ids in tags.column(S.CLASS_IDS).to_pylist())


def test_tsn_cache_train_eval_predict(world):
    config, tsn_list, cache = "configs/tsn-single.yaml", str(world["root"] / "tsn.list"), str(world["out"] / "cache")
    out = job(world, "cache_frames.py", "--config", config, "--filelist", tsn_list, "--save_dir", cache, *o(*TSN))
    assert "processed now         6 ok, 0 failed" in out
    ckpt = world["out"] / "tsn"
    out = job(world, "train.py", "--model_name=TSN", "--config", config, "--save_dir", str(ckpt),
              *o(*TSN, f"TRAIN.filelist={tsn_list}", f"VALID.filelist={tsn_list}", f"frame_cache.path={cache}"))  # fmt: skip
    assert "1 x 3 steps per epoch" in out  # tsn-single: TRAIN.num_gpus 1 -> 1 worker x 2 videos per step, 6 videos
    assert (ckpt / "TSN" / "best" / "model.pdparams").exists()
    out = job(world, "eval.py", "--model_name=TSN", "--config", config, "--weights", str(ckpt / "TSN"),
              "--filelist", tsn_list, "--save_dir", str(world["out"] / "tsn_eval"), *o(*TSN))  # fmt: skip
    assert json.loads((world["out"] / "tsn_eval" / "report.json").read_text())["num_videos"] == 6
    job(world, "predict.py", "--model_name=TSN", "--config", config, "--weights", str(ckpt / "TSN"),
        "--filelist", tsn_list, "--save_dir", str(world["out"] / "tsn_predict"), *o(*TSN))  # fmt: skip
    assert pq.read_table(world["out"] / "tsn_predict" / "predictions").num_rows == 6


@ONE_CPU
def test_nightly(world):
    registry = world["out"] / "registry"
    nightly = [f"nightly.library={world['lib']}", f"nightly.labels={world['root'] / 'labels.list'}"]
    nightly += [f"nightly.holdout={world['root'] / 'holdout.list'}", f"nightly.registry={registry}"]
    nightly += ["nightly.tsn_weights=null", "nightly.pretrain=null", f"tag.label_file={world['root'] / 'names.txt'}"]
    out = job(world, "nightly.py", "--config", "configs/nightly.yaml",
              *o(*EXTRACT, *LSTM, "resources.train_workers=1", *nightly))  # fmt: skip
    assert "decision            first" in out
    current = json.loads((registry / "tags" / S.CURRENT_TAGS_FILE).read_text())
    assert pq.read_table(Path(current["tags"]) / S.TAGS_DIR).num_rows == len(CLIPS)


# --- joining a cluster -----------------------------------------------------------------------


@pytest.fixture
def stale_cluster_file():
    """`/tmp/ray/ray_current_cluster` naming a cluster that has stopped, as `ray start` leaves it."""
    path = Path("/tmp/ray/ray_current_cluster")
    saved = path.read_text() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"127.0.0.1:{free_port()}\n")  # nothing listens there
    try:
        yield path
    finally:
        if saved is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(saved)


def test_a_stale_local_cluster_is_ignored_without_ray_address(stale_cluster_file, files, tmp_path):
    res = run_job("extract.py", "--config", "configs/tsn.yaml", "--filelist", str(files["root"] / "library.list"),
                  "--save_dir", str(tmp_path / "out"), *o(*EXTRACT), env={"RAY_ADDRESS": ""}, timeout=JOB_TIMEOUT)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Failed to get cluster ID" not in res.stderr


# What Ray Train's placement group cleaner (an actor of every training run) does each second: from
# inside its worker it asks the State API of the cluster it looks up whether the run's controller
# lives, and removes the run's placement group when that cluster says no such actor is alive.
LOOKUP_FROM_A_WORKER = """
import os, sys, time
from pathlib import Path
from vtplatform import cli
context = cli.start_local_ray(num_cpus=1)
import ray
from ray.util.state import get_actor
assert "RAY_API_SERVER_ADDRESS" not in os.environ  # the driver's own environment is as it was
Path("/tmp/ray/ray_current_cluster").write_text(sys.argv[1])  # another Ray on this machine, started later

@ray.remote(num_cpus=0)
class Controller:
    def ping(self):
        return 1

@ray.remote(num_cpus=0)
def lookup(actor_id):
    start = time.monotonic()
    state = get_actor(actor_id, timeout=10)
    return os.environ.get("RAY_API_SERVER_ADDRESS"), state.state if state else None, time.monotonic() - start

controller = Controller.remote()
ray.get(controller.ping.remote())
print("http://" + context.dashboard_url, *ray.get(lookup.remote(controller._actor_id.hex())))
ray.shutdown()
"""


def test_the_workers_of_a_jobs_own_ray_look_up_their_own_cluster(stale_cluster_file, ray_cluster):
    """A job without RAY_ADDRESS starts its own Ray (cli.start_local_ray); its workers must ask that
    Ray about its actors even when `/tmp/ray/ray_current_cluster` names another live one (here the
    session's). Before, Ray Train's placement group cleaner asked the other Ray, which knew no such
    controller, and removed the placement group of a running training: it then waited forever."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    res = subprocess.run([sys.executable, "-c", LOOKUP_FROM_A_WORKER, ray_cluster], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    dashboard, seen, state, seconds = res.stdout.split()[-4:]
    assert seen == dashboard and state == "ALIVE" and float(seconds) < 5, res.stdout


@pytest.mark.parametrize("address", ["auto", "127.0.0.1:{port}"])
def test_a_dead_ray_address_fails_in_seconds(stale_cluster_file, files, tmp_path, address):
    start = time.monotonic()
    res = run_job("train.py", "--model_name=AttentionLSTM", "--config", "configs/attention_lstm-single.yaml",
                  "--save_dir", str(tmp_path), env={"RAY_ADDRESS": address.format(port=free_port())}, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    assert "no Ray cluster answers there" in res.stderr and "unset RAY_ADDRESS" in res.stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    ("variable", "value"),
    [("VTP_FAULT_DECODE", "crsh:x"), ("VTP_FAULT_INJECT", "1-5"), ("VTP_NIGHTLY_STOP_AFTER", "training")],
)
def test_a_malformed_fault_hook_is_a_configuration_error_naming_it(files, tmp_path, variable, value):
    start = time.monotonic()
    res = run_job("extract.py", "--config", "configs/tsn.yaml", "--filelist", str(files["root"] / "library.list"),
                  "--save_dir", str(tmp_path), env={variable: value, "RAY_ADDRESS": ""}, timeout=120)  # fmt: skip
    assert res.returncode == 2 and variable in res.stderr, res.stderr[-2000:]
    assert time.monotonic() - start < 30
    assert not os.listdir(tmp_path)  # nothing ran


@pytest.mark.parametrize("script", ["extract.py", "train.py"])
def test_gpus_the_cluster_does_not_have_fail_in_seconds_naming_the_keys(files, tmp_path, script):
    """`resources.use_gpu=true` on a machine without GPUs: exit 2 in seconds, never a wait."""
    tsn_list, start = str(files["root"] / "tsn.list"), time.monotonic()
    args = {
        "extract.py": ["--config", "configs/tsn.yaml", "--filelist", tsn_list],
        "train.py": ["--model_name=TSN", "--config", "configs/tsn.yaml", "-o", f"TRAIN.filelist={tsn_list}"],
    }[script]
    res = run_job(script, *args, "--save_dir", str(tmp_path), "-o", "resources.use_gpu=true",
                  env={"RAY_ADDRESS": ""}, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no GPUs" in res.stderr and "resources.use_gpu=auto or false" in res.stderr
    assert time.monotonic() - start < 45
