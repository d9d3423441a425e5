"""Checkpoint directories: exact round trips of weights and optimizer state, and every way
evaluation and inference find weights (files, checkpoints, run folders; local and S3)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import paddle
import pyarrow.fs as pafs
import pytest

from tests.conftest import GOLDEN
from vtplatform import schema as S
from vtplatform.config import ConfigError, StorageSection
from vtplatform.models import weights as W
from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map
from vtplatform.storage import RetryingS3
from vtplatform.train import checkpoint

TINY = AttentionLSTMConfig(feature_dim=6, embedding_size=4, lstm_size=3, fc1_size=5, fc2_size=4, num_classes=3)


def _opt(model):
    return paddle.optimizer.RMSProp(
        0.01, rho=0.95, epsilon=1e-6, centered=True, parameters=model.parameters(), weight_decay=1e-3
    )


def _step(model, opt, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.random((2, 4, 6)).astype(np.float32))
    y = paddle.to_tensor((rng.random((2, 3)) < 0.5).astype(np.float32))
    loss = paddle.nn.functional.binary_cross_entropy_with_logits(
        model(x, paddle.to_tensor(np.array([4, 2]))), y, reduction="sum"
    )
    loss.backward()
    opt.step()
    opt.clear_grad()


def _params(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_weights_and_optimizer_state_round_trip_exactly(tmp_path):
    model = build_model(TINY, seed=1)
    model.eval()  # no dropout: the two continuations must agree bit for bit
    opt = _opt(model)
    for s in range(3):
        _step(model, opt, s)
    meta = {
        **checkpoint.TrainState(epoch=1, step=2, global_step=5, best=0.5, history=[{"epoch": 0}]).to_meta(),
        "extra": "x",
    }
    checkpoint.save(tmp_path / "ck", model=model, optimizer=opt, name_map=fluid_name_map(), meta=meta)

    other = build_model(TINY, seed=99)  # different init and different Paddle-generated names
    other.eval()
    other_opt = _opt(other)
    assert [p.name for p in other.parameters()] != [p.name for p in model.parameters()]
    loaded = checkpoint.load(tmp_path / "ck", model=other, optimizer=other_opt, name_map=fluid_name_map())
    assert loaded == json.loads(json.dumps(meta))
    assert checkpoint.TrainState.from_meta(loaded) == checkpoint.TrainState(1, 2, 5, 0.5, [{"epoch": 0}])
    for key, value in _params(model).items():
        np.testing.assert_array_equal(other.state_dict()[key].numpy(), value, err_msg=key)
    _step(model, opt, 7)
    _step(other, other_opt, 7)
    for key, value in _params(model).items():  # the RMSProp moments came back too
        np.testing.assert_array_equal(other.state_dict()[key].numpy(), value, err_msg=key)


def test_momentum_survives_a_round_trip_with_a_learning_rate_schedule(tmp_path):
    """An optimizer driven by an LR scheduler (TSN's Momentum + PiecewiseDecay) has the
    scheduler in its state dict from the start; the accumulators must still be restored (they
    were silently dropped, so a TSN run resumed mid-epoch lost its momentum)."""

    def momentum(model):
        schedule = paddle.optimizer.lr.PiecewiseDecay([4], [0.1, 0.01])
        return paddle.optimizer.Momentum(schedule, momentum=0.9, parameters=model.parameters(), weight_decay=1e-4)

    model = build_model(TINY, seed=1)
    model.eval()
    opt = momentum(model)
    for s in range(3):
        _step(model, opt, s)
    checkpoint.save(tmp_path / "ck", model=model, optimizer=opt, name_map=fluid_name_map(), meta={"epoch": 0})
    saved = checkpoint.optimizer_state(model, opt)
    assert saved and all(np.abs(v).max() > 0 for v in saved.values())

    other = build_model(TINY, seed=99)
    other.eval()
    other_opt = momentum(other)
    assert "LR_Scheduler" in other_opt.state_dict()
    checkpoint.load(tmp_path / "ck", model=other, optimizer=other_opt, name_map=fluid_name_map())
    restored = checkpoint.optimizer_state(other, other_opt)
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(restored[key], value, err_msg=key)
    _step(model, opt, 7)
    _step(other, other_opt, 7)
    for key, value in _params(model).items():
        np.testing.assert_array_equal(_params(other)[key], value, err_msg=key)


def test_optimizer_state_is_keyed_by_parameter_names(tmp_path):
    model = build_model(TINY)
    opt = _opt(model)
    _step(model, opt, 0)
    keys = set(checkpoint.optimizer_state(model, opt))
    assert "rgb_fc.weight/momentum" in keys and "rgb_lstm_backward.bias/mean_grad" in keys
    assert len(keys) == 3 * len(model.state_dict())  # centred RMSProp: momentum, mean square, mean grad


def test_checkpoint_files_are_official_format_weights(tmp_path):
    model = build_model(TINY)
    checkpoint.save(tmp_path / "ck", model=model, optimizer=None, name_map=fluid_name_map(), meta={})
    with open(tmp_path / "ck" / S.MODEL_FILE, "rb") as f:
        state = pickle.load(f)  # plain pickle of {fluid name: ndarray}, as fluid 1.8 wrote
    assert list(state) == list(fluid_name_map())
    assert sorted(os.listdir(tmp_path / "ck")) == ["meta.json", "model.pdparams"]


def _fake_run(root, names: list[str], best: str | None = None) -> None:
    for name in names + ([S.BEST_DIR] if best else []):
        d = root / name
        d.mkdir(parents=True)
        (d / S.MODEL_FILE).write_bytes(pickle.dumps({"w": np.full(2, float(len(name)), np.float32)}, protocol=2))
        (d / S.META_FILE).write_text(json.dumps({"name": best if name == S.BEST_DIR else name}))


def test_read_weights_finds_files_checkpoints_and_runs(tmp_path):
    storage = StorageSection()
    loaded = W.read_weights(str(GOLDEN / "attention_lstm_small.pdparams"), storage)
    assert loaded.meta is None and "output.w_0" in loaded.state
    seedlike = W.read_weights(str(GOLDEN / "attention_lstm_small"), storage)  # the seed's --pretrain without suffix
    assert seedlike.source.endswith(".pdparams")

    run = tmp_path / "run"
    _fake_run(run, ["epoch_001_step_0000000", "epoch_002_step_0000000", "epoch_001_step_0000005"])
    assert [p.rsplit("/", 1)[1] for p in W.list_checkpoints(str(run), storage)] == [
        "epoch_001_step_0000000",
        "epoch_001_step_0000005",
        "epoch_002_step_0000000",
    ]
    assert W.read_weights(str(run), storage).meta == {"name": "epoch_002_step_0000000"}  # the latest
    assert W.read_weights(str(run / "epoch_001_step_0000005"), storage).meta == {"name": "epoch_001_step_0000005"}
    _fake_run(tmp_path / "run2", ["epoch_001_step_0000000"], best="epoch_000_step_0000003")
    assert W.read_weights(str(tmp_path / "run2"), storage).meta == {"name": "epoch_000_step_0000003"}  # best/ wins
    with pytest.raises(ConfigError, match="not found"):
        W.read_weights(str(tmp_path / "nope"), storage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        W.read_weights(str(tmp_path / "empty"), storage)


def test_read_weights_from_s3(moto_endpoint, s3_bucket, tmp_path):
    storage = StorageSection(endpoint_url=moto_endpoint)
    _fake_run(tmp_path / "run", ["epoch_000_step_0000002", "epoch_001_step_0000000"])
    fs = pafs.S3FileSystem(endpoint_override=moto_endpoint.split("://")[1], scheme="http", region="us-east-1")
    pafs.copy_files(str(tmp_path / "run"), f"{s3_bucket}/runs/r1", destination_filesystem=fs)
    loaded = W.read_weights(f"s3://{s3_bucket}/runs/r1", storage)
    assert (
        loaded.meta == {"name": "epoch_001_step_0000000"}
        and loaded.source == f"s3://{s3_bucket}/runs/r1/epoch_001_step_0000000"
    )
    np.testing.assert_array_equal(loaded.state["w"], [22.0, 22.0])


def test_run_config_for_local_and_s3(moto_endpoint, tmp_path):
    local = checkpoint.run_config(str(tmp_path / "ck"), "r", StorageSection(), keep_last=2, max_failures=3)
    assert local.storage_path == str(tmp_path / "ck") and local.storage_filesystem is None and local.name == "r"
    assert local.checkpoint_config.num_to_keep == 2 and local.failure_config.max_failures == 3
    s3 = checkpoint.run_config(
        "s3://bucket/a/b/", "r", StorageSection(endpoint_url=moto_endpoint), keep_last=1, max_failures=0
    )
    assert s3.storage_path == "bucket/a/b"  # Ray Train's uploads go through the storage retry policy:
    assert isinstance(s3.storage_filesystem.handler, RetryingS3)
