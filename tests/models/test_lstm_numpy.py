"""The numpy AttentionLSTM engine that the CPU stages run (``models/lstm_numpy.py``) against the
original VideoTag graph (golden fixtures) and against the Paddle model it is built from."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from tests.conftest import GOLDEN
from tests.models.test_attention_lstm import SMALL, _pad
from vtplatform.config import StorageSection
from vtplatform.models import weights as W
from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map, load_weights
from vtplatform.models.lstm_numpy import NumpyAttentionLSTM, lstm
from vtplatform.stages.lstm import ModelSpec, forward_logits, inference_model


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "attention_lstm_small.npz"))


@pytest.fixture(scope="module")
def engine():
    model = build_model(SMALL)
    model.eval()
    load_weights(model, GOLDEN / "attention_lstm_small.pdparams")
    return NumpyAttentionLSTM.from_model(model)


def test_each_sequence_alone_and_a_padded_batch_reproduce_the_original(golden, engine):
    lengths = golden["lengths"]  # [300, 17, 1]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for i, n in enumerate(lengths):
        logits = engine.logits(golden["inputs"][None, offsets[i] : offsets[i + 1]], np.array([n]))
        np.testing.assert_allclose(logits[0], golden["logits"][i], atol=1e-5, rtol=0)
        np.testing.assert_allclose(1 / (1 + np.exp(-logits[0])), golden["probs"][i], atol=2e-6, rtol=0)
    logits = engine.logits(_pad(golden["inputs"], lengths), lengths)
    np.testing.assert_allclose(logits, golden["logits_batched"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), golden["probs_batched"], atol=2e-6, rtol=0)


@pytest.mark.parametrize("case", ["moderate_H32", "saturating_H8", "naive_path_H12"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_the_recurrence_is_fluids_lstm_op(case, direction):
    """The original op's outputs, sequences of mixed lengths in one call; the saturating case stops
    at sigmoid(13): Paddle's clip inside the op."""
    d = np.load(GOLDEN / "lstm_op_cases.npz")
    x, weight, bias = (d[f"{case}/{k}"].astype(np.float32) for k in ("x", "weight", "bias"))
    hidden = lstm(x, weight, bias, d[f"{case}/lengths"], direction == "reverse")
    np.testing.assert_allclose(hidden, d[f"{case}/hidden_{direction}"], atol=1e-6, rtol=0)
    if case.startswith("saturating"):
        assert hidden.max() <= 1 / (1 + np.exp(-13.0)) + 1e-7


def test_the_full_size_model_gives_the_paddle_models_logits(tmp_path):
    """Full size (2048 -> 1024, LSTM 512, fc 8192/4096, 3396 classes), every parameter random and
    non-zero (peepholes and biases included), sequences of mixed lengths padded in one call, and
    the same engine built by the stages from a checkpoint file."""
    paddle.seed(3)
    model = build_model(AttentionLSTMConfig(), seed=3)
    rng = np.random.default_rng(3)
    for value in model.state_dict().values():
        scale = 2.0 / np.sqrt(value.shape[0])  # gates and head neither saturated nor flat
        value.set_value(rng.normal(0, scale, value.shape).astype(np.float32))
    model.eval()
    x = rng.normal(0, 1, (4, 300, 2048)).astype(np.float32)
    lengths = np.array([300, 200, 37, 1])
    expected = forward_logits(model, x, lengths)
    assert expected.std() > 0.1  # logits that differ between classes and videos
    np.testing.assert_allclose(NumpyAttentionLSTM.from_model(model).logits(x, lengths), expected, atol=1e-5, rtol=0)

    path = tmp_path / "full.pdparams"
    W.save_state(model, fluid_name_map(model), path)
    engine = inference_model(ModelSpec(AttentionLSTMConfig(), str(path), StorageSection()))
    assert isinstance(engine.__self__, NumpyAttentionLSTM)  # the CPU stages' engine
    np.testing.assert_allclose(engine(x, lengths), expected, atol=1e-5, rtol=0)
    on_paddle = inference_model(ModelSpec(AttentionLSTMConfig(lstm_kernel="op"), str(path), StorageSection()))
    np.testing.assert_array_equal(on_paddle(x, lengths), expected)  # MODEL.lstm_kernel set: the Paddle model


def test_the_engine_runs_on_the_actors_threads(tmp_path):
    from threadpoolctl import threadpool_info, threadpool_limits

    model = build_model(SMALL)
    W.save_state(model, fluid_name_map(model), tmp_path / "small.pdparams")
    saved = threadpool_limits(None)  # this process's BLAS threads, restored below
    try:
        for threads in (1, 2):
            inference_model(ModelSpec(SMALL, str(tmp_path / "small.pdparams"), StorageSection(), threads=threads))
            blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
            assert blas and set(blas) == {threads}
    finally:
        saved.restore_original_limits()
