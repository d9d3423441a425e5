"""The AttentionLSTM fine-tune: the seed's optimiser and schedule, and fault tolerance (a worker
process killed mid-epoch, a driver killed with its Ray and rerun) replaying an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from tests.conftest import ROOT, SEED
from tests.ray_nodes import kill_job_midway, kill_later, own_ray
from tests.synthetic_features import make_videos, write_feature_table, write_list
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
from vtplatform.config import ConfigError, StorageSection, load_config
from vtplatform.faults import TRAIN_ENV as FAULT_ENV
from vtplatform.models import weights as W
from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model
from vtplatform.train.lstm import make_optimizer, run_train, train_step

TINY = AttentionLSTMConfig(
    feature_dim=6, embedding_size=4, lstm_size=3, fc1_size=5, fc2_size=4, num_classes=3, drop_rate=0.0
)


def test_centred_rmsprop_with_the_seeds_l2_exemptions():
    """Two steps against fluid's update rule, written out in NumPy."""
    model = build_model(TINY, seed=2)
    lr, decay, rho, eps = 0.01, 8e-4, 0.95, 1e-6
    opt = make_optimizer(model, lr, decay)
    exempt = {"rgb_fc.bias", "fc1.bias", "fc2.bias", "output.bias"}
    params = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    ms = {k: np.zeros_like(v) for k, v in params.items()}
    mg = {k: np.zeros_like(v) for k, v in params.items()}
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.random((2, 3, 6)).astype(np.float32)
        y = (rng.random((2, 3)) < 0.5).astype(np.float32)
        loss = paddle.nn.functional.binary_cross_entropy_with_logits(
            model(paddle.to_tensor(x), paddle.to_tensor(np.array([3, 2]))), paddle.to_tensor(y), reduction="sum"
        )
        loss.backward()
        grads = {k: p.grad.numpy().astype(np.float64) for k, p in model.named_parameters()}
        opt.step()
        opt.clear_grad()
        for k in params:
            g = grads[k] + (0.0 if k in exempt else decay * params[k])
            ms[k] = rho * ms[k] + (1 - rho) * g * g
            mg[k] = rho * mg[k] + (1 - rho) * g
            params[k] = params[k] - lr * g / np.sqrt(ms[k] - mg[k] ** 2 + eps)
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), params[k], atol=2e-5, rtol=1e-4, err_msg=k)


def test_exempt_biases_do_not_decay():
    model = build_model(TINY, seed=3)
    for p in (model.rgb_fc.bias, model.fc1.bias, model.fc2.bias, model.output.bias, model.rgb_lstm_forward.bias):
        p.set_value(np.ones(p.shape, np.float32))
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, 0.1, 0.5)
    (paddle.add_n([(p * 0.0).sum() for p in model.parameters()])).backward()  # zero data gradient: only decay moves
    opt.step()
    after = {k: v.numpy() for k, v in model.state_dict().items()}
    for key in ("rgb_fc.bias", "fc1.bias", "fc2.bias", "output.bias"):
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert np.all(after["rgb_lstm_forward.bias"] < 1.0)  # the LSTM's biases and peepholes decay, as in fluid
    assert not np.allclose(after["fc1.weight"], before["fc1.weight"])


def test_piecewise_decay_at_the_seeds_epochs(tmp_path):
    from vtplatform.train.lstm import LSTMTrainee

    fields = {f: None for f in LSTMTrainee.__dataclass_fields__}
    trainee = LSTMTrainee(**{**fields, "learning_rates": (1e-3, (5, 8), 0.1)})
    rates = [trainee.learning_rate(e, 1000 * e) for e in (0, 4, 5, 7, 8, 9)]
    assert rates == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])


def test_loss_sums_classes_and_the_global_batch():
    model = build_model(TINY, seed=4)
    model.eval()
    x = np.random.default_rng(1).random((3, 2, 6)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)
    opt = make_optimizer(model, 0.0, 0.0)
    per_video, logits = train_step(model, opt, x, np.array([2, 2, 1]), y, world_size=1)
    expected = np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))
    np.testing.assert_allclose(per_video, expected.sum(axis=1), rtol=1e-5)


# --- Ray Train runs --------------------------------------------------------------------------

SMALL_DIMS = [
    "MODEL.num_classes=4",
    "MODEL.embedding_size=8",
    "MODEL.lstm_size=8",
    "MODEL.fc1_size=16",
    "MODEL.fc2_size=8",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lstm_train")
    ids, feats, labels = make_videos(36, 6, 10, 4, seed=5)
    table = write_feature_table(root, ids, feats, rows_per_file=5)
    write_list(root / "train.list", [f"{v}.npy" for v in ids[:28]], labels[:28])
    write_list(root / "val.list", [f"{v}.npy" for v in ids[28:]], labels[28:])
    return root, table


def _config(dataset, *extra: str):
    root, table = dataset
    return load_config(
        SEED / "configs" / "attention_lstm.yaml",
        [
            *SMALL_DIMS,
            f"data.features={table}",
            f"TRAIN.filelist={root / 'train.list'}",
            f"VALID.filelist={root / 'val.list'}",
            "TRAIN.batch_size=8",
            "VALID.batch_size=8",
            "TRAIN.epoch=2",
            "TRAIN.learning_rate=0.002",
            "TRAIN.decay_epochs=[1]",
            "resources.train_workers=2",
            "resources.train_cpus=0.5",
            "resources.train_threads=1",
            "train_run.checkpoint_every_steps=2",
            "train_run.keep_checkpoints=10",
            "train_run.shuffle_buffer=8",
            "resources.use_gpu=false",
            *extra,
        ],
    )


def _final_weights(save_dir, run: str = "AttentionLSTM") -> dict[str, np.ndarray]:
    from vtplatform.config import StorageSection
    from vtplatform.models.weights import list_checkpoints

    last = list_checkpoints(f"{save_dir}/{run}", StorageSection())[-1]
    assert last.endswith("epoch_002_step_0000000")
    return W.read_state(f"{last}/model.pdparams")


# --- real faults: processes killed at moments the training code did not choose ----------------

KILL_DIMS = [  # steps slow enough (tens of ms) that a kill lands mid-epoch
    "MODEL.num_classes=4",
    "MODEL.embedding_size=64",
    "MODEL.lstm_size=64",
    "MODEL.fc1_size=128",
    "MODEL.fc2_size=64",
]


@pytest.fixture(scope="module")
def long_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lstm_kill")
    ids, feats, labels = make_videos(96, 40, 128, 4, seed=9)
    table = write_feature_table(root, ids, feats, rows_per_file=8)
    write_list(root / "train.list", [f"{v}.npy" for v in ids[:80]], labels[:80])
    write_list(root / "val.list", [f"{v}.npy" for v in ids[80:]], labels[80:])
    return root, table


def _kill_overrides(long_dataset) -> list[str]:
    root, table = long_dataset
    return [
        *KILL_DIMS,
        f"data.features={table}",
        f"TRAIN.filelist={root / 'train.list'}",
        f"VALID.filelist={root / 'val.list'}",
        "TRAIN.batch_size=8",
        "VALID.batch_size=8",
        "TRAIN.epoch=3",
        "TRAIN.learning_rate=0.002",
        "TRAIN.decay_epochs=[2]",
        "resources.train_workers=2",
        "resources.train_threads=1",
        "train_run.checkpoint_every_steps=3",
        "train_run.keep_checkpoints=20",
        "train_run.shuffle_buffer=8",
        "resources.use_gpu=false",
    ]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, long_dataset, tmp_path_factory):
    """The final weights and history of a run nothing happened to."""
    out = tmp_path_factory.mktemp("lstm_plain")
    config = load_config(ROOT / "configs" / "attention_lstm-single.yaml", _kill_overrides(long_dataset))
    summary = run_train(config, str(out), run_name="AttentionLSTM")
    assert summary.epochs_finished == 3 and summary.global_step == 30  # 80 videos / 2 workers / 4 per worker
    run = out / "AttentionLSTM"
    history = json.loads((run / "history.json").read_text())
    for h in history:  # the worker's own memory, sampled at each step, within its peak RSS
        assert 50 < h["worker_private_peak_mb"] <= h["worker_peak_mb"], h
    return _last_weights(run), history


def _last_weights(run: Path) -> dict[str, np.ndarray]:
    last = sorted(run.glob("epoch_*"))[-1]
    assert last.name == "epoch_003_step_0000000"
    return W.read_state(last / "model.pdparams")


def _assert_same_weights(run: Path, reference: dict[str, np.ndarray]) -> None:
    final = _last_weights(run)
    assert final.keys() == reference.keys()
    for key, value in final.items():
        np.testing.assert_allclose(value, reference[key], rtol=0, atol=1e-6, err_msg=key)


def _numbers(history: list[dict]) -> list[dict]:
    """History without what depends on the machine's speed and memory."""
    return [
        {k: v for k, v in h.items() if k not in ("epoch_seconds", "worker_peak_mb", "worker_private_peak_mb")}
        for h in history
    ]


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_resumes_to_the_uninterrupted_weights(
    ray_cluster, long_dataset, uninterrupted, tmp_path
):
    """SIGKILL of one worker process of this test's Ray, by pid, a random moment after the first
    mid-epoch checkpoint: Ray Train restarts the group from the last checkpoint, the new workers
    replay the data order from there, and the run ends with the uninterrupted run's weights."""
    config = load_config(ROOT / "configs" / "attention_lstm-single.yaml", _kill_overrides(long_dataset))
    run = tmp_path / "AttentionLSTM"
    ray = own_ray()
    ready = registered_after(run, "epoch_000_step_0000003")  # the first mid-epoch checkpoint
    killer = kill_later(ready, lambda: kill_a_training_worker(ray, run, 2), what="a worker")
    summary = run_train(config, str(tmp_path), run_name="AttentionLSTM")
    kill = killer.landed()
    assert_recovered(ray, run, kill, "epoch_003_step_0000000", killer.replay)
    assert summary.epochs_finished == 3 and summary.global_step == 30, killer.replay
    _assert_same_weights(run, uninterrupted[0])
    history = _numbers(json.loads((run / "history.json").read_text()))
    assert history == [pytest.approx(h, rel=1e-6) for h in _numbers(uninterrupted[1])]  # the part-done epoch's too


@pytest.mark.slow
def test_a_killed_driver_and_its_ray_rerun_to_the_uninterrupted_weights(long_dataset, uninterrupted, tmp_path):
    """`python jobs/train.py` starts its own Ray; SIGKILL of the driver and everything it started
    (its raylet, GCS and workers) mid-epoch, then the same command again resumes."""
    command = [
        sys.executable, str(ROOT / "jobs" / "train.py"), "--model_name=AttentionLSTM",
        "--config", str(ROOT / "configs" / "attention_lstm-single.yaml"), "--save_dir", str(tmp_path), *[a for o in _kill_overrides(long_dataset) for a in ("-o", o)],
    ]  # fmt: skip
    run = tmp_path / "AttentionLSTM"
    killed = kill_job_midway(command, ROOT, registered_after(run, "epoch_001_step_0000002"), timeout=600)
    at_kill, known = on_disk(run), registered(run)  # what the dead job left: its Ray died with it
    assert "epoch_001_step_0000002" in at_kill, (at_kill, killed.replay)  # global step 12: epoch 1, step 2
    env = {**os.environ, "RAY_ADDRESS": ""}
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    resumed = resumed_in(rerun.stderr)
    assert_resumed(run, resumed, at_kill, known, killed.at, "epoch_003_step_0000000", killed.replay)
    _assert_same_weights(run, uninterrupted[0])


def test_the_fault_drill_hook_makes_one_worker_raise_once(ray_cluster, dataset, tmp_path, monkeypatch):
    """VTP_FAULT_INJECT (a Python-level drill; the tests above kill processes): worker 1 raises
    before global step 5, once; Ray Train restarts the group from the step-4 checkpoint and the
    run finishes."""
    monkeypatch.setenv(FAULT_ENV, "1:5")
    faulted = run_train(_config(dataset), str(tmp_path / "b"))
    run_b = tmp_path / "b" / "AttentionLSTM"
    assert (run_b / "_fault_injected_1_5").exists() and (run_b / "epoch_001_step_0000001").is_dir()  # global step 4
    assert faulted.global_step == 6 and faulted.epochs_finished == 2
    # the run files and the checkpoint meta every trainer writes (tests/train/test_tsn.py: the same for TSN)
    tags, history = run_files(run_b)
    assert {"train/loss", "train/lr", "epoch/train_loss", "epoch/valid_gap"} <= tags
    assert [h["epoch"] for h in history] == [0, 1] and all("valid_gap" in h for h in history)
    meta = json.loads((run_b / "epoch_002_step_0000000" / "meta.json").read_text())
    assert set(meta) == META_KEYS and meta["model_name"] == "AttentionLSTM" and meta["best_metric"] == "valid_gap"
    assert meta["num_classes"] == meta["model"]["num_classes"] and meta["history"] == history
    loaded = W.read_weights(str(run_b / "epoch_002_step_0000000"), StorageSection())
    assert loaded.checkpoint == W.CheckpointMeta.from_dict(meta) and loaded.checkpoint.to_dict() == meta
    with pytest.raises(ConfigError, match="is an AttentionLSTM checkpoint, not a TSN one"):
        loaded.require("TSN")
    assert "AttentionLSTM training summary" in faulted.format() and "2 (6 steps)" in faulted.format()


def test_too_few_videos_for_a_batch_is_a_clear_error(ray_cluster, dataset):
    with pytest.raises(ConfigError, match="no full batch"):
        run_train(_config(dataset, "TRAIN.batch_size=64"), "/nonexistent")
    with pytest.raises(ConfigError, match="amp=float16 needs GPUs"):
        run_train(_config(dataset, "train_run.amp=float16"), "/nonexistent")
    assert not os.path.exists("/nonexistent")
