"""The Paddle backend on Ray Train V2: two CPU workers joined by gloo keep identical parameters,
and their data-parallel steps equal one worker's steps on the whole global batch."""

from __future__ import annotations

import numpy as np
import pytest

from vtplatform.models.attention_lstm import AttentionLSTMConfig

TINY = AttentionLSTMConfig(
    feature_dim=6, embedding_size=4, lstm_size=3, fc1_size=5, fc2_size=4, num_classes=3, drop_rate=0.0
)
STEPS, LOCAL_BATCH = 3, 2


def _batch(rank: int, step: int):
    rng = np.random.default_rng(100 * step + rank)
    x = rng.random((LOCAL_BATCH, 4, TINY.feature_dim)).astype(np.float32)
    lengths = np.array([4, 2 + rank], dtype=np.int64)
    y = (rng.random((LOCAL_BATCH, TINY.num_classes)) < 0.5).astype(np.float32)
    return x, lengths, y


def _one_ulp_up(values: np.ndarray) -> np.ndarray:
    """``values`` with its first element moved to the next representable float."""
    out = values.copy()
    out.flat[0] = np.nextafter(out.flat[0], np.inf, dtype=out.dtype)
    return out


def _small_net():
    import paddle

    paddle.seed(0)
    return paddle.nn.Sequential(paddle.nn.Linear(5, 4), paddle.nn.BatchNorm1D(4), paddle.nn.Linear(4, 3))


def test_replica_digest_sees_one_ulp_in_any_trainable_parameter():
    from vtplatform.train.backend import replica_digest

    net = _small_net()
    base = replica_digest(net)
    assert base.dtype == np.int64 and base.shape == (4,)
    np.testing.assert_array_equal(replica_digest(_small_net()), base)  # the same weights, the same digest
    trainable = [p for p in net.parameters() if not p.stop_gradient]
    assert len(trainable) == 6  # two Linear layers and the BN scale and shift
    for param in trainable:
        original = param.numpy()
        param.set_value(_one_ulp_up(original))
        assert not np.array_equal(replica_digest(net), base), param.name
        param.set_value(original)
        np.testing.assert_array_equal(replica_digest(net), base)


def test_replica_digest_ignores_batch_norm_running_statistics():
    from vtplatform.train.backend import replica_digest

    net = _small_net()
    base = replica_digest(net)
    stats = [p for p in net.parameters() if p.stop_gradient]
    assert len(stats) == 2  # BN running mean and variance: per-worker, as in the seed
    for buffer in stats:
        buffer.set_value(buffer.numpy() + 0.5)
    np.testing.assert_array_equal(replica_digest(net), base)


def test_two_cpu_workers_keep_identical_parameters(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from vtplatform.train.backend import PaddleBackendConfig

    out = str(tmp_path)

    def train_fn(config):
        import os

        import paddle

        from vtplatform.models.attention_lstm import build_model
        from vtplatform.train.backend import check_replicas, setup_paddle
        from vtplatform.train.lstm import make_optimizer, train_step

        ctx = setup_paddle(threads=1)
        model = build_model(
            config["model"], seed=ctx.rank
        )  # different inits: DataParallel starts everyone from rank 0's
        optimizer = make_optimizer(model, 0.01, 8e-4)
        net = paddle.DataParallel(model)
        for step in range(config["steps"]):
            x, lengths, y = config["batch"](ctx.rank, step)
            train_step(net, optimizer, x, lengths, y, ctx.world_size)
        env = [
            os.environ[k]
            for k in ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_DISTRI_BACKEND", "PADDLE_MASTER")
        ]
        check_replicas(model, ctx.world_size)  # passes while in sync
        diverged = False
        if ctx.rank == 1:  # one ulp in one element: a float64 sum per parameter would not see it
            model.fc1.bias.set_value(_one_ulp_up(model.fc1.bias.numpy()))
        try:
            check_replicas(model, ctx.world_size)
        except RuntimeError as exc:
            diverged = "diverged" in str(exc)
        np.savez(f"{config['out']}/rank{ctx.rank}.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
        np.save(f"{config['out']}/env{ctx.rank}.npy", np.array([*env, str(diverged)]))

    trainer = DataParallelTrainer(
        train_fn,
        train_loop_config={"model": TINY, "steps": STEPS, "batch": _batch, "out": out},
        backend_config=PaddleBackendConfig(),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="sync", storage_path=str(tmp_path / "storage")),
    )
    trainer.fit()

    env0, env1 = np.load(tmp_path / "env0.npy"), np.load(tmp_path / "env1.npy")
    assert env0.tolist()[:3] == ["0", "2", "gloo"] and env1.tolist()[:3] == ["1", "2", "gloo"]
    assert env0[3] == env1[3]  # one master (rank 0's TCP store)
    assert env0[4] == env1[4] == "True"  # check_replicas caught the perturbed copy on both ranks
    rank0, rank1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    for key in rank0.files:
        expected = _one_ulp_up(rank0[key]) if key == "fc1.bias" else rank0[key]  # the perturbation after training
        np.testing.assert_array_equal(rank1[key], expected, err_msg=key)

    # One worker on the concatenated global batch takes the same steps (the seed's summed loss).
    import paddle

    from vtplatform.models.attention_lstm import build_model
    from vtplatform.train.lstm import make_optimizer, train_step

    model = build_model(TINY, seed=0)
    optimizer = make_optimizer(model, 0.01, 8e-4)
    for step in range(STEPS):
        parts = [_batch(rank, step) for rank in (0, 1)]
        t = max(p[0].shape[1] for p in parts)
        x = np.concatenate([p[0][:, :t] for p in parts])
        train_step(model, optimizer, x, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]), 1)
    single = {k: v.numpy() for k, v in model.state_dict().items()}
    moved = max(np.abs(single[k] - build_model(TINY, seed=0).state_dict()[k].numpy()).max() for k in single)
    assert moved > 1e-3  # training did something
    for key in rank0.files:
        np.testing.assert_allclose(rank0[key], single[key], atol=2e-5, rtol=0, err_msg=key)
    assert paddle.get_device() == "cpu"


def test_backend_config_rejects_unknown_backends():
    from vtplatform.train.backend import PaddleBackend, PaddleBackendConfig

    assert PaddleBackendConfig().backend_cls is PaddleBackend
    with pytest.raises(ValueError, match="gloo"):
        PaddleBackendConfig(backend="mpi")
