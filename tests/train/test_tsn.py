"""TSN fine-tuning on Ray Train: the seed's recipe, a 2-worker run that must learn, gradient
synchronisation, dead letters, eval/predict on the result, kills and resume (S3: tests/test_s3_faults.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, SEED, run_job
from tests.ray_nodes import kill_job_midway, kill_later, own_ray
from tests.train.kills import (
    assert_recovered,
    assert_resumed,
    kill_a_training_worker,
    on_disk,
    registered,
    registered_after,
    resumed_in,
)
from tests.train.run_files import META_KEYS, run_files
from tests.tsn_clips import SMALL_FRAMES, write_class_clips, write_list
from vtplatform import schema as S
from vtplatform.config import ConfigError, StorageSection, load_config
from vtplatform.models import weights as W
from vtplatform.resources import TrainSizes
from vtplatform.train import tsn as T

SMALL = [
    "MODEL.num_classes=3",
    "MODEL.num_layers=18",
    "TRAIN.batch_size=6",
    "TRAIN.learning_rate=0.01",
    "resources.train_workers=2",
    "resources.train_cpus=0.5",
    "resources.train_threads=1",
    "train_run.log_interval=3",
    "resources.tsn_threads=1",
]
SMALL += [*SMALL_FRAMES, "INFER.seg_num=5"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """36 training and 12 validation clips in 3 classes that differ only in colour cast, plus 2
    bad training entries (a corrupt file and a missing one)."""
    root = tmp_path_factory.mktemp("tsn_clips")
    train = write_class_clips(root / "train", 12, seed=1)
    valid = write_class_clips(root / "valid", 4, seed=2)
    corrupt = root / "train" / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    lists = {
        "train": write_list(root / "train.list", train),
        "train_bad": write_list(root / "train_bad.list", [*train, (corrupt, 0), (root / "train" / "missing.mp4", 1)]),
        "valid": write_list(root / "valid.list", valid),
    }
    labels = root / "labels.txt"
    labels.write_text("reddish\ngreenish\nbluish\n")
    return {"root": root, "lists": lists, "labels": labels, "corrupt": corrupt}


def _config(clips, *overrides, train="train"):
    files = [f"TRAIN.filelist={clips['lists'][train]}", f"VALID.filelist={clips['lists']['valid']}"]
    files += [f"TEST.filelist={clips['lists']['valid']}", f"INFER.filelist={clips['lists']['valid']}"]
    return load_config(SEED / "configs" / "tsn.yaml", [*SMALL, *files, *overrides])


def test_seed_schedule_drops_tenfold_at_a_third_and_two_thirds():
    assert T.lr_boundaries(45, 10) == [150, 300]
    assert T.lr_boundaries(4, 3) == [4, 8]  # ceil(4/3*3)=4, ceil(8/3*3)=8
    # The rate the loop sets at each global step of the run (optimizer.set_lr before the step).
    trainee = T.TSNTrainee.__new__(T.TSNTrainee)
    trainee.epochs, trainee.steps_per_epoch, trainee.base_rate, trainee.rate_decay = 45, 10, 0.01, 0.1
    rates = [trainee.learning_rate(step // 10, step) for step in range(301)]
    assert rates[149] == 0.01 and rates[150] == pytest.approx(0.001) and rates[300] == pytest.approx(0.0001)
    assert rates[299] == pytest.approx(0.001)

    import paddle

    w = paddle.create_parameter(
        [3], "float32", default_initializer=paddle.nn.initializer.Assign(np.array([1.0, -2.0, 0.5], np.float32))
    )
    optimizer = T.make_optimizer(0.01, 0.9, 1e-4, [w])
    # Momentum 0.9 with L2 1e-4 folded into the gradient: v = 0.9 v + (g + 1e-4 w); w -= lr * v
    expected, velocity = w.numpy().astype(np.float64), np.zeros(3)
    for _ in range(3):
        loss = (w * paddle.to_tensor([1.0, 2.0, 3.0])).sum()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        velocity = 0.9 * velocity + (np.array([1.0, 2.0, 3.0]) + 1e-4 * expected)
        expected = expected - 0.01 * velocity
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


def test_seed_configs_and_lists_as_they_are(tmp_path, monkeypatch):
    """tsn.yaml / tsn-single.yaml unchanged: 8 workers x 32 or 1 x 32 videos per step, the seed's
    relative list paths, 3 validation and 7 test segments; MODEL.format: frames reads frame lists."""
    monkeypatch.chdir(tmp_path)
    lists = tmp_path / "data" / "dataset" / "tsn"
    lists.mkdir(parents=True)
    for name in ("train", "val"):
        (lists / f"{name}.list").write_text("".join(f"data/mp4/{i}.mp4 {i % 400}\n" for i in range(300)))
    for name, workers in (("tsn.yaml", 8), ("tsn-single.yaml", 1)):
        config = load_config(SEED / "configs" / name)
        spec, loop, _ = T.prepare(config, None, _plan(config.train.num_gpus), "labels")
        assert config.train.num_gpus == workers
        assert spec.batch_size == 32 and spec.model.depth == 101 and spec.model.num_classes == 400
        assert spec.steps_per_epoch == loop.steps_per_epoch == 300 // workers // 32
        assert spec.train.seg_num == 3 and spec.valid.seg_num == 3 and spec.train.target_size == 224
        assert spec.train_entries.column(S.URI).to_pylist()[0] == str(tmp_path / "data/mp4/0.mp4")
        assert (spec.momentum, spec.l2_weight_decay, spec.rate_decay) == (0.9, 1e-4, 0.1)
    assert load_config(SEED / "configs" / "tsn.yaml").test.seg_num == 7
    (lists / "train.list").write_text("".join(f"frames/v{i} {40 + i} {i % 3}\n" for i in range(64)))
    config = load_config(SEED / "configs" / "tsn-single.yaml", ["MODEL.format=frames", "VALID.filelist=None"])
    spec, _, _ = T.prepare(config, None, _plan(1), "labels")
    assert spec.train.source_format == "frames" and spec.valid is None
    assert spec.train_entries.column(S.NUM_FRAMES).to_pylist()[:2] == [40, 41]
    with pytest.raises(ConfigError, match="cannot fill one batch"):
        T.prepare(
            load_config(SEED / "configs" / "tsn.yaml", ["VALID.filelist=None", "MODEL.format=frames"]),
            None,
            _plan(8),
            "x",
        )


def test_mixed_precision_without_gpus_is_refused_as_for_attention_lstm(ray_cluster, clips, tmp_path):
    """One placement policy (train.scaffold.place): TSN used to fall back to float32 silently."""
    with pytest.raises(ConfigError, match="amp=float16 needs GPUs"):
        T.run_train(_config(clips, "train_run.amp=float16", "resources.use_gpu=false"), str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def _plan(workers: int) -> TrainSizes:
    return TrainSizes(workers, use_gpu=False, cpus_per_worker=0.5, threads=1, task_cpus=1.0)


def _sync_probe(out_dir: Path):
    """A worker function: trains, then writes its trainable parameters' fingerprint and pid."""

    def fn(config):
        import ray.train

        from vtplatform.models import tsn_classifier as tc
        from vtplatform.train import scaffold

        rank = ray.train.get_context().get_world_rank()
        (out_dir / f"pid{rank}").write_text(str(os.getpid()))
        model = scaffold.train_worker(config)
        trainable = [(n, p.numpy()) for n, p in model.named_parameters() if not p.stop_gradient]
        (out_dir / f"rank{rank}.json").write_text(
            json.dumps({"trainable": W.fingerprint(trainable), "all": tc.fingerprint(model)})
        )

    return fn


@pytest.fixture(scope="module")
def learned(ray_cluster, clips, tmp_path_factory):
    """A 2-worker run of 5 epochs that learns the classes (with 2 bad entries in its list), its
    workers' parameter fingerprints, and its config; the predict job's test uses its weights too."""
    tmp_path = tmp_path_factory.mktemp("tsn_learned")
    config = _config(clips, "TRAIN.epoch=5", "train_run.valid_interval=2", train="train_bad")
    probe = tmp_path / "probe"
    probe.mkdir()
    summary = T.run_train(config, str(tmp_path / "runs"), label_file=str(clips["labels"]), worker=_sync_probe(probe))
    return {"summary": summary, "probe": probe, "config": config, "root": tmp_path}


def test_two_workers_learn_the_classes_in_sync_and_dead_letter_bad_videos(ray_cluster, clips, learned):
    summary, probe, config, tmp_path = learned["summary"], learned["probe"], learned["config"], learned["root"]
    m = summary.metrics
    assert m["epoch"] == 4 and m["valid_videos"] == 12
    # chance is 1/3: the colour classes were learned (this recipe scored 0.83-1.0 over 20 augmentation seeds on
    # 56-pixel crops, and 0.83-1.0 over train_run.seed 1-6 on the 32-pixel crops used here)
    assert m["valid_top1"] >= 0.75, m
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["trainable"] == ranks[1]["trainable"]  # gradients were averaged: identical parameters
    assert ranks[0]["all"] != ranks[1]["all"]  # while batch-norm statistics stay per worker, as in the seed
    # the bad entries were dead-lettered and training went on
    assert summary.dead_letters == 2 and summary.train_videos == 38
    dead = pq.read_table(tmp_path / "runs" / "TSN" / "dead_letters").to_pylist()
    assert {(Path(d[S.URI]).name, d[S.STAGE]) for d in dead} == {("corrupt.mp4", "decode"), ("missing.mp4", "read")}
    run = tmp_path / "runs" / "TSN"
    assert sorted(p.name for p in run.glob("epoch_*")) == [  # the last 3 (train_run.keep_checkpoints)
        "epoch_003_step_0000000",
        "epoch_004_step_0000000",
        "epoch_005_step_0000000",
    ]
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["model_name"] == "TSN" and meta["num_classes"] == 3 and meta["epoch"] >= 1
    assert [h["epoch"] for h in meta["history"]] == list(range(meta["epoch"]))
    assert ["valid_top1" in h for h in meta["history"]] == [False, True, False, True, True][: meta["epoch"]]
    # TensorBoard, history and curves, and the checkpoint meta, as AttentionLSTM runs write them
    tags, history = run_files(run)
    assert {"train/loss", "train/lr", "epoch/train_loss", "epoch/valid_top1"} <= tags
    assert [h["epoch"] for h in history] == list(range(5)) and history[-1]["valid_videos"] == 12
    assert set(meta) == META_KEYS | {"depth"} and meta["best_metric"] == "valid_top1"  # depth: as TSN always wrote
    assert meta["model"]["depth"] == meta["depth"] == 18 and (meta["num_workers"], meta["steps_per_epoch"]) == (2, 6)
    loaded = W.read_weights(str(run), StorageSection())
    assert loaded.checkpoint.to_dict() == meta  # best/
    with pytest.raises(ConfigError, match="is a TSN checkpoint, not an AttentionLSTM one"):
        loaded.require("AttentionLSTM")
    assert "TSN training summary" in summary.format() and f"{meta['best']:.4f} (" in summary.format()
    saved = W.read_state(run / "epoch_005_step_0000000" / "model.pdparams")
    assert saved["fc_0.w_0"].shape == (512, 3) and "conv1_weights" in saved  # fluid names, like the official files
    assert W.fingerprint((n, saved[n]) for n in saved) != ""

    # evaluation of the run (its best/ checkpoint); prediction runs in the slow job test
    from vtplatform.eval.tsn import run_eval

    report = run_eval(config, str(run), str(tmp_path / "eval"), label_file=str(clips["labels"]))
    assert report["TOP1_ACC"] >= 0.75 and report["TOP5_ACC"] == 1.0 and report["num_videos"] == 12
    assert [c["support"] for c in report["per_class"]] == [4, 4, 4]
    assert report["per_class"][2]["class_name"] == "bluish"
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["TOP1_ACC"] == report["TOP1_ACC"]


def _final_weights(run: Path) -> dict:
    last = sorted(run.glob("epoch_*"))[-1]
    return W.read_state(last / "model.pdparams")


KILL = [
    "TRAIN.epoch=1",
    "TRAIN.learning_rate=0.002",
    "train_run.checkpoint_every_steps=2",
    "train_run.keep_checkpoints=10",
]


@pytest.fixture(scope="module")
def plain_run(ray_cluster, clips, tmp_path_factory) -> Path:
    """The save_dir of a run (``KILL``) nothing happened to."""
    out = tmp_path_factory.mktemp("tsn_plain")
    T.run_train(_config(clips, *KILL), str(out))
    return out


@pytest.fixture(scope="module")
def uninterrupted(plain_run) -> dict[str, np.ndarray]:
    """The final weights of a run nothing happened to.

    The learning rate is low enough that training does not amplify rounding: CPU math kernels are
    not bit-reproducible across processes (memory alignment), and at 0.01 a 1e-7 difference grows
    500-fold in 8 steps. A resume that lost the momentum, the rate schedule or the data position
    differs by 1e-5 or more here."""
    return _final_weights(plain_run / "TSN")


def _assert_resumed_to(run: Path, plain: dict[str, np.ndarray]) -> None:
    resumed = _final_weights(run)
    assert plain.keys() == resumed.keys() and sorted(run.glob("epoch_*"))[-1].name == "epoch_001_step_0000000"
    for name in plain:
        np.testing.assert_allclose(resumed[name], plain[name], rtol=0, atol=1e-6, err_msg=name)
    moved = max(
        float(np.abs(plain[n] - W.read_state(run / "epoch_000_step_0000002" / "model.pdparams")[n]).max())
        for n in plain
    )
    assert moved > 1e-4  # the steps after the resume did change the weights


@pytest.mark.slow
def test_a_worker_killed_midway_resumes_to_the_uninterrupted_weights(ray_cluster, clips, uninterrupted, tmp_path):
    """SIGKILL of one worker process of this test's Ray, by pid, a random moment after the first
    mid-epoch checkpoint; Ray Train restarts the group from the last checkpoint and the run ends
    with the weights of a run that was never interrupted."""
    run = tmp_path / "killed" / "TSN"
    ray = own_ray()
    ready = registered_after(run, "epoch_000_step_0000002")  # the first mid-epoch checkpoint
    killer = kill_later(ready, lambda: kill_a_training_worker(ray, run, 2), what="a worker")
    summary = T.run_train(_config(clips, *KILL), str(tmp_path / "killed"))
    kill = killer.landed()
    assert_recovered(ray, run, kill, "epoch_001_step_0000000", killer.replay)
    assert summary.metrics["epoch"] == 0
    _assert_resumed_to(run, uninterrupted)


@pytest.mark.slow
def test_a_killed_driver_and_its_ray_rerun_to_the_uninterrupted_weights(clips, uninterrupted, tmp_path):
    """`python jobs/train.py --model_name=TSN` with its own Ray, SIGKILLed (driver, raylet, GCS
    and workers) mid-epoch, then the same command again."""
    files = [f"TRAIN.filelist={clips['lists']['train']}", f"VALID.filelist={clips['lists']['valid']}"]
    command = [
        sys.executable, str(ROOT / "jobs" / "train.py"), "--model_name=TSN", "--config", str(SEED / "configs" / "tsn.yaml"),
        "--save_dir", str(tmp_path), *[a for o in [*SMALL, *files, *KILL] for a in ("-o", o)],
    ]  # fmt: skip
    run = tmp_path / "TSN"
    killed = kill_job_midway(command, ROOT, registered_after(run, "epoch_000_step_0000004"))
    at_kill, known = on_disk(run), registered(run)  # what the dead job left: its Ray died with it
    assert "epoch_000_step_0000004" in at_kill, (at_kill, killed.replay)
    env = {**os.environ, "RAY_ADDRESS": ""}
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    resumed = resumed_in(rerun.stderr)
    assert_resumed(run, resumed, at_kill, known, killed.at, "epoch_001_step_0000000", killed.replay)
    _assert_resumed_to(run, uninterrupted)


@pytest.mark.slow
def test_a_finished_run_rerun_with_more_epochs_goes_on_from_its_last_checkpoint(
    ray_cluster, clips, plain_run, uninterrupted
):
    """A second run with the same name and save_dir (a driver restarted with TRAIN.epoch raised)
    continues where the first stopped: only the new epoch runs, from the first run's last weights.
    (Checkpoints on S3, resumed after a killed driver and read back by eval and predict:
    tests/test_s3_faults.py, through a throttling S3.)"""
    from vtplatform.models.weights import list_checkpoints, read_weights

    run = plain_run / "TSN"
    second = T.run_train(_config(clips, *KILL[1:], "TRAIN.epoch=2"), str(plain_run))
    assert second.metrics["epoch"] == 1  # only epoch 1 ran: epoch 0 came from the checkpoint
    names = [c.rsplit("/", 1)[1] for c in list_checkpoints(str(run), StorageSection())]
    assert sorted(names) == [  # every 2 steps of the run (6 an epoch), the first run's kept (keep_checkpoints=10)
        "epoch_000_step_0000002",
        "epoch_000_step_0000004",
        "epoch_001_step_0000000",
        "epoch_001_step_0000002",
        "epoch_001_step_0000004",
        "epoch_002_step_0000000",
    ]
    meta = read_weights(str(run), StorageSection()).meta
    assert meta["model_name"] == "TSN" and meta["num_classes"] == 3
    assert [h["epoch"] for h in meta["history"]] == [0, 1][: len(meta["history"])]
    moved = max(float(np.abs(_final_weights(run)[n] - uninterrupted[n]).max()) for n in uninterrupted)
    assert moved > 1e-4  # the new epoch trained on from the first run's weights


@pytest.mark.slow
def test_predict_job_with_the_single_gpu_seed_config(ray_cluster, clips, learned, tmp_path):
    """jobs/predict.py as a user runs it, on tsn-single.yaml, with the weights of the run that learned
    the classes (``learned``, the same model on the same clips), whose top-1 must be right; and
    jobs/train.py refusing the AttentionLSTM config for TSN. (jobs/train.py training TSN on
    tsn-single.yaml, 1 worker, runs in tests/test_user_world.py, on 1 CPU and on this machine's.)"""
    overrides = [o for o in SMALL if not o.startswith("resources.train_workers")]
    overrides += [f"INFER.filelist={clips['lists']['valid']}"]
    args = [a for o in overrides for a in ("-o", o)]
    env = {"RAY_ADDRESS": ray_cluster}
    config = str(SEED / "configs" / "tsn-single.yaml")
    weights, labels = str(learned["root"] / "runs" / "TSN"), str(clips["labels"])
    res = run_job(
        "predict.py", "--model_name=TSN", "--config", config, "--weights", weights, "--label_file", labels,
        "--save_dir", str(tmp_path / "pred"), "--seed_json", *args, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((tmp_path / "pred" / "json").glob("result*.json"))) == 12
    table = pq.read_table(tmp_path / "pred" / "predictions")
    assert table.schema.remove_metadata().equals(S.PREDICTION_SCHEMA)
    top1 = [ids[0] for ids in table.column(S.CLASS_IDS).to_pylist()]
    truth = [int(Path(u).name[1]) for u in table.column(S.URI).to_pylist()]  # c<label>_<i>.mp4
    assert np.mean(np.array(top1) == np.array(truth)) >= 0.75
    assert table.column(S.CLASS_NAMES)[0].as_py()[0] == ["reddish", "greenish", "bluish"][top1[0]]
    first = json.loads((tmp_path / "pred" / "json" / "result0.json").read_text())
    assert first[0] == table.column(S.VIDEO_ID)[0].as_py()
    assert [set(d) for d in first[1:]] == [{"class_id", "class_name", "probability"}] * 3
    res = run_job(
        "train.py",
        "--model_name=TSN",
        "--config",
        str(SEED / "configs" / "attention_lstm.yaml"),
        "--save_dir",
        str(tmp_path / "x"),
        env=env,
    )
    assert res.returncode == 2 and "MODEL.name" in res.stderr


@pytest.mark.slow
def test_training_from_the_cache_ends_with_the_weights_of_training_from_videos(
    ray_cluster, clips, uninterrupted, tmp_path
):
    """uint8 cache: the same batches, hence the same weights after an epoch on 2 workers as the run
    that read the videos (``uninterrupted``, the same config without the cache), up to the CPU
    kernels' cross-process rounding (see the kill test)."""
    from vtplatform.frame_cache import run_cache

    config = _config(clips, *KILL, "frame_cache.encoding=uint8")
    run_cache(config, str(clips["lists"]["train"]), str(tmp_path / "cache"))
    cached = _config(clips, *KILL, "frame_cache.encoding=uint8", f"frame_cache.path={tmp_path / 'cache'}")
    from_cache = T.run_train(cached, str(tmp_path / "cached"))
    assert from_cache.cached == 36
    b = _final_weights(tmp_path / "cached" / "TSN")
    assert b.keys() == uninterrupted.keys()
    for name in uninterrupted:
        np.testing.assert_allclose(b[name], uninterrupted[name], rtol=0, atol=1e-6, err_msg=name)


def _frames_layout(items, root: Path) -> list[tuple[Path, int, int]]:
    """Decodes clips into the seed's layout: DIR/img_00001.jpg ..."""
    import av
    from PIL import Image

    out = []
    for path, label in items:
        folder = root / path.stem
        folder.mkdir(parents=True)
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                Image.fromarray(frame.to_ndarray(format="rgb24")).save(folder / f"img_{i + 1:05d}.jpg", quality=95)
        out.append((folder, i + 1, label))
    return out


@pytest.mark.slow
def test_the_seed_frames_layout_trains(ray_cluster, clips, tmp_path):
    train = _frames_layout(write_class_clips(tmp_path / "tv", 12, seed=5), tmp_path / "train_frames")
    valid = _frames_layout(write_class_clips(tmp_path / "vv", 3, seed=6), tmp_path / "valid_frames")
    for name, items in (("train", train), ("valid", valid)):
        (tmp_path / f"{name}.list").write_text("".join(f"{d} {n} {label}\n" for d, n, label in items))
    overrides = ["MODEL.format=frames", "TRAIN.epoch=5"]
    overrides += [f"TRAIN.filelist={tmp_path / 'train.list'}", f"VALID.filelist={tmp_path / 'valid.list'}"]
    summary = T.run_train(load_config(SEED / "configs" / "tsn.yaml", [*SMALL, *overrides]), str(tmp_path / "runs"))
    assert (summary.train_videos, summary.dead_letters, summary.metrics["valid_videos"]) == (36, 0, 9), summary
    assert summary.metrics["valid_top1"] >= 0.75, summary.metrics  # chance is 1/3
