"""AttentionLSTM against the original VideoTag graph (golden fixtures) and an independent float64
NumPy implementation; official-weight loading; the fine-tune to a new label set."""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle

import numpy as np
import paddle
import pytest

from tests.conftest import GOLDEN
from vtplatform.models import weights as W
from vtplatform.models.attention_lstm import (
    NO_DECAY,
    AttentionLSTMConfig,
    build_model,
    fluid_name_map,
    load_state,
    load_weights,
    lstm_op,
    no_decay_keys,
    peephole_lstm,
)

SMALL = AttentionLSTMConfig(
    feature_dim=2048, embedding_size=64, lstm_size=32, fc1_size=128, fc2_size=64, num_classes=20
)
TINY = AttentionLSTMConfig(feature_dim=12, embedding_size=8, lstm_size=6, fc1_size=10, fc2_size=7, num_classes=5)


def _weights_module():
    spec = importlib.util.spec_from_file_location(
        "make_attention_lstm_weights", GOLDEN / "make_attention_lstm_weights.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pad(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out = np.zeros((len(lengths), int(lengths.max()), flat.shape[1]), dtype=np.float32)
    for i in range(len(lengths)):
        out[i, : lengths[i]] = flat[offsets[i] : offsets[i + 1]]
    return out


def _run(model, x: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    with paddle.no_grad():
        out = model.forward_with_intermediates(paddle.to_tensor(x), paddle.to_tensor(np.asarray(lengths, np.int64)))
    return {k: v.numpy() for k, v in out.items()}


# --- an independent float64 NumPy implementation of the original graph ---------------------


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-np.clip(a, -40.0, 13.0)))


def _np_lstm(x, w, b, reverse):
    h_size = w.shape[0]
    h, c = np.zeros(h_size), np.zeros(h_size)
    hs = np.zeros((len(x), h_size))
    steps = range(len(x) - 1, -1, -1) if reverse else range(len(x))
    for t in steps:
        g = x[t] + h @ w + b[0, : 4 * h_size]
        gc, gi, gf, go = np.split(g, 4)
        wic, wfc, woc = np.split(b[0, 4 * h_size :], 3)
        i = _sigmoid(gi + c * wic)
        f = _sigmoid(gf + c * wfc)
        c = np.tanh(gc) * i + c * f
        o = _sigmoid(go + c * woc)
        h = o * np.tanh(c)
        hs[t] = h
    return hs


def _np_attention_lstm(state: dict, seq: np.ndarray) -> np.ndarray:
    p = {k: v.astype(np.float64) for k, v in state.items()}
    emb = np.tanh(seq.astype(np.float64) @ p["rgb_fc.w_0"] + p["rgb_fc.b_0"])
    fwd = _np_lstm(emb @ p["rgb_fc_forward.w_0"], p["rgb_lstm_forward.w_0"], p["rgb_lstm_forward.b_0"], False)
    bwd = _np_lstm(emb @ p["rgb_fc_backward.w_0"], p["rgb_lstm_backward.w_0"], p["rgb_lstm_backward.b_0"], True)
    d = 0.5 * np.concatenate([fwd, bwd], axis=1)  # dropout at inference (downgrade_in_infer)
    s = (d @ p["rgb_weight.w_0"])[:, 0]
    a = np.exp(s - s.max())
    a /= a.sum()
    pooled = (d * a[:, None]).sum(axis=0)
    fc1 = np.maximum(pooled @ p["fc1.w_0"] + p["fc1.b_0"], 0)
    fc2 = np.tanh(fc1 @ p["fc2.w_0"] + p["fc2.b_0"])
    return fc2 @ p["output.w_0"] + p["output.b_0"]


# --- golden fidelity ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "attention_lstm_small.npz"))


@pytest.fixture(scope="module", params=["op", "python"])
def small_model(request):
    """Both LSTM kernels: fluid's own (Paddle still ships it) and our recurrence."""
    model = build_model(AttentionLSTMConfig(**{**SMALL.__dict__, "lstm_kernel": request.param}))
    model.eval()
    load_weights(model, GOLDEN / "attention_lstm_small.pdparams")
    return model


def test_golden_config_matches_our_small_dims(golden):
    cfg = json.loads(str(golden["config"]))
    assert (cfg["embedding_size"], cfg["lstm_size"], cfg["fc1_size"], cfg["fc2_size"], cfg["num_classes"]) == (
        64,
        32,
        128,
        64,
        20,
    )
    assert cfg["feature_dims"] == [SMALL.feature_dim]


def test_each_sequence_alone_reproduces_the_original(golden, small_model):
    lengths = golden["lengths"]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for i, n in enumerate(lengths):
        out = _run(small_model, golden["inputs"][None, offsets[i] : offsets[i + 1]], [n])
        np.testing.assert_allclose(out["logits"][0], golden["logits"][i], atol=1e-5, rtol=0)
        np.testing.assert_allclose(1 / (1 + np.exp(-out["logits"][0])), golden["probs"][i], atol=2e-6, rtol=0)


def test_padded_lod_batch_reproduces_the_original_and_its_intermediates(golden, small_model):
    lengths = golden["lengths"]  # [300, 17, 1]
    out = _run(small_model, _pad(golden["inputs"], lengths), lengths)
    np.testing.assert_allclose(out["logits"], golden["logits_batched"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(1 / (1 + np.exp(-out["logits"])), golden["probs_batched"], atol=2e-6, rtol=0)
    for key in ("rgb_fc_out", "lstm_fwd_hidden", "lstm_bwd_hidden", "att_weight"):  # packed in LoD order, as the golden
        np.testing.assert_allclose(out[key], golden[key], atol=5e-6, rtol=0, err_msg=key)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    sums = [out["att_weight"][offsets[i] : offsets[i + 1]].sum() for i in range(len(lengths))]
    np.testing.assert_allclose(sums, 1.0, atol=1e-6)  # a softmax over each sequence's own steps
    for key in ("pooled", "fc1", "fc2"):
        np.testing.assert_allclose(out[key], golden[key], atol=5e-6, rtol=0, err_msg=key)


@pytest.mark.parametrize("kernel", ["op", "python"])
@pytest.mark.parametrize("case", ["moderate_H32", "saturating_H8", "naive_path_H12"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_lstm_op_cases(case, direction, kernel):
    d = np.load(GOLDEN / "lstm_op_cases.npz")
    args = (d[f"{case}/x"], d[f"{case}/weight"], d[f"{case}/bias"], d[f"{case}/lengths"], direction == "reverse")
    hidden, cell = lstm_op(*args, kernel=kernel)
    np.testing.assert_allclose(hidden, d[f"{case}/hidden_{direction}"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(cell, d[f"{case}/cell_{direction}"], atol=1e-6, rtol=0)


def test_saturating_case_needs_paddles_sigmoid_clip():
    """The fixture saturates the gates: its hidden state stops at sigmoid(13), not at 1."""
    d = np.load(GOLDEN / "lstm_op_cases.npz")
    args = (d["saturating_H8/x"], d["saturating_H8/weight"], d["saturating_H8/bias"], d["saturating_H8/lengths"])
    for kernel in ("op", "python"):
        hidden, _ = lstm_op(*args, kernel=kernel)
        assert hidden.max() <= 1 / (1 + np.exp(-13.0)) + 1e-7


def test_auto_kernel_is_fluids_own_on_this_build():
    from vtplatform.models.attention_lstm import lstm_kernel

    assert lstm_kernel("auto") == "op" and lstm_kernel("python") == "python"


# --- padded batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["op", "python"])
def test_padded_batch_of_mixed_lengths_equals_each_sequence_alone(kernel):
    model = build_model(AttentionLSTMConfig(**{**TINY.__dict__, "lstm_kernel": kernel}), seed=3)
    model.eval()
    rng = np.random.default_rng(0)
    lengths = np.array([9, 1, 5, 9, 2])
    x = rng.exponential(0.6, (len(lengths), 9, TINY.feature_dim)).astype(np.float32)
    for i, n in enumerate(lengths):
        x[i, n:] = rng.normal(0, 50, (9 - n, TINY.feature_dim))  # garbage in the padding must not matter
    batched = _run(model, x, lengths)["logits"]
    for i, n in enumerate(lengths):
        alone = _run(model, x[i : i + 1, :n], [n])["logits"][0]
        np.testing.assert_allclose(batched[i], alone, atol=2e-6, rtol=0)


@pytest.mark.parametrize("kernel", ["op", "python"])
def test_reverse_direction_runs_over_each_sequences_own_length(kernel):
    """Against the float64 reference: a reverse pass over the padded length would differ."""
    rng = np.random.default_rng(1)
    state = {n: rng.normal(0, 0.5, s).astype(np.float32) for n, s in _table(TINY)}
    model = build_model(AttentionLSTMConfig(**{**TINY.__dict__, "lstm_kernel": kernel}))
    model.eval()
    load_state(model, state)
    lengths = np.array([7, 3])
    x = rng.exponential(0.6, (2, 7, TINY.feature_dim)).astype(np.float32)
    out = _run(model, x, lengths)["logits"]
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(out[i], _np_attention_lstm(state, x[i, :n]), atol=1e-5, rtol=0)


def _table(cfg: AttentionLSTMConfig) -> list[tuple[str, tuple[int, ...]]]:
    dims = {
        "feature_dim": cfg.feature_dim,
        "embedding_size": cfg.embedding_size,
        "lstm_size": cfg.lstm_size,
        "fc1_size": cfg.fc1_size,
        "fc2_size": cfg.fc2_size,
        "num_classes": cfg.num_classes,
    }
    return _weights_module().attention_lstm_param_table(**dims)


# --- gradients ---------------------------------------------------------------------------------


def test_handwritten_backward_matches_autograd_of_the_same_recurrence():
    paddle.set_default_dtype("float64")
    try:
        k, b, t, h = 2, 3, 5, 4
        rng = np.random.default_rng(0)
        x0, w0, b0 = (
            rng.normal(0, 1, (k, b, t, 4 * h)),
            rng.normal(0, 0.5, (k, h, 4 * h)),
            rng.normal(0, 0.5, (k, 1, 7 * h)),
        )
        gh, gc = rng.normal(0, 1, (k, b, t, h)), rng.normal(0, 1, (k, b, t, h))

        def autograd_lstm(x, w, bias):
            hs, cs = [], []
            hh = paddle.zeros([k, b, h], "float64")
            cc = paddle.zeros([k, b, h], "float64")
            sig = paddle.nn.functional.sigmoid
            for step in range(t):
                g = x[:, :, step] + bias[:, :, : 4 * h] + paddle.bmm(hh, w)
                g_c, g_i, g_f, g_o = paddle.split(g, 4, -1)
                i = sig(g_i + cc * bias[:, :, 4 * h : 5 * h])
                f = sig(g_f + cc * bias[:, :, 5 * h : 6 * h])
                cc = paddle.tanh(g_c) * i + cc * f
                hh = sig(g_o + cc * bias[:, :, 6 * h :]) * paddle.tanh(cc)
                hs.append(hh)
                cs.append(cc)
            return paddle.stack(hs, axis=2), paddle.stack(cs, axis=2)

        grads = []
        for fn in (autograd_lstm, lambda *v: peephole_lstm(*v, with_cell=True)):
            xs = [paddle.to_tensor(v, stop_gradient=False) for v in (x0, w0, b0)]
            hidden, cell = fn(*xs)
            ((hidden * paddle.to_tensor(gh)).sum() + (cell * paddle.to_tensor(gc)).sum()).backward()
            grads.append([hidden.numpy()] + [v.grad.numpy() for v in xs])
    finally:
        paddle.set_default_dtype("float32")
    for ours, ref, name in zip(grads[1], grads[0], ["hidden", "d_x", "d_weight", "d_bias"], strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-12, rtol=0, err_msg=name)


@pytest.mark.parametrize("kernel", ["op", "python"])
def test_whole_model_gradients_match_finite_differences(kernel):
    model = build_model(AttentionLSTMConfig(**{**TINY.__dict__, "lstm_kernel": kernel}), seed=5)
    model.eval()  # no dropout, so the loss is a deterministic function of the weights
    rng = np.random.default_rng(2)
    x = paddle.to_tensor(rng.exponential(0.6, (2, 4, TINY.feature_dim)).astype(np.float32))
    lengths = paddle.to_tensor(np.array([4, 2]))
    loss = model(x, lengths).sum()
    loss.backward()
    param = model.rgb_lstm_backward.bias  # peepholes and gate biases of the reverse direction
    analytic = param.grad.numpy().copy()
    base = param.numpy().copy()
    for index in [(0, 1), (0, 6 * TINY.lstm_size + 2), (0, 4 * TINY.lstm_size)]:
        eps = 1e-2
        values = []
        for sign in (1, -1):
            changed = base.copy()
            changed[index] += sign * eps
            param.set_value(changed)
            with paddle.no_grad():
                values.append(float(model(x, lengths).sum()))
        param.set_value(base)
        assert analytic[index] == pytest.approx((values[0] - values[1]) / (2 * eps), rel=2e-2, abs=1e-4)


# --- weights -----------------------------------------------------------------------------------


def test_parameter_names_and_shapes_are_the_official_table():
    official = json.loads((GOLDEN / "attention_lstm_official_shapes.json").read_text())["params"]
    model = build_model(AttentionLSTMConfig())
    params = model.state_dict()
    mapping = fluid_name_map(model)
    assert list(mapping) == [p["name"] for p in official]  # creation order too
    for p in official:
        assert list(params[mapping[p["name"]]].shape) == p["shape"], p["name"]
    assert set(mapping.values()) == set(params)  # nothing else in the model


def test_official_full_size_file_loads_directly_and_matches_float64(tmp_path):
    module = _weights_module()
    weights = module.make_attention_lstm_weights(module.FULL)
    path = tmp_path / "attention_lstm.pdparams"
    with open(path, "wb") as f:
        pickle.dump(dict(weights), f, protocol=2)  # as fluid 1.8 wrote them
    model = build_model(AttentionLSTMConfig())
    model.eval()
    summary = load_weights(model, path)
    assert summary["reinitialised"] == [] and summary["unused"] == []
    assert summary["fingerprint"] == module.weights_sha256(weights)
    rng = np.random.default_rng(4)
    lengths = np.array([12, 5])
    x = rng.exponential(0.6, (2, 12, 2048)).astype(np.float32)
    logits = _run(model, x, lengths)["logits"]
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(logits[i], _np_attention_lstm(weights, x[i, :n]), atol=1e-4, rtol=0)


def test_new_label_set_reinitialises_only_the_output_layer(caplog):
    state = W.read_state(GOLDEN / "attention_lstm_small.pdparams")
    model = build_model(AttentionLSTMConfig(**{**SMALL.__dict__, "num_classes": 7}))
    with caplog.at_level(logging.WARNING, logger="vtplatform.models.attention_lstm"):
        summary = load_state(model, state, "small.pdparams", seed=1)
    assert summary["reinitialised"] == ["output.w_0", "output.b_0"]
    assert "re-initialised" in caplog.text and "20 output classes" in caplog.text
    params = model.state_dict()
    for name, key in fluid_name_map(model).items():
        if name.startswith("output."):
            continue
        np.testing.assert_array_equal(params[key].numpy(), state[name], err_msg=name)
    w_out = params["output.weight"].numpy()
    assert w_out.shape == (64, 7) and np.all(params["output.bias"].numpy() == 0)
    limit = np.sqrt(6 / (64 + 7))
    assert np.abs(w_out).max() <= limit and w_out.std() > limit / 4  # Xavier-uniform, not left at zero


def test_other_shape_mismatches_still_fail_clearly():
    state = W.read_state(GOLDEN / "attention_lstm_small.pdparams")
    model = build_model(AttentionLSTMConfig(**{**SMALL.__dict__, "lstm_size": 16}))
    with pytest.raises(W.WeightsError, match=r"rgb_fc_forward\.w_0"):
        load_state(model, state)
    with pytest.raises(W.WeightsError, match="missing"):
        load_state(build_model(SMALL), {k: v for k, v in state.items() if k != "fc2.b_0"})


def test_no_decay_parameters_are_the_seeds_biases():
    assert no_decay_keys() == {"rgb_fc.bias", "fc1.bias", "fc2.bias", "output.bias"}
    assert set(NO_DECAY) == {"rgb_fc.b_0", "fc1.b_0", "fc2.b_0", "output.b_0"}


def test_config_from_the_seed_model_section():
    from vtplatform.config import load_config

    config = load_config(GOLDEN.parent / "videotag" / "configs" / "attention_lstm.yaml")
    cfg = AttentionLSTMConfig.from_model_section(config.model)
    assert (cfg.feature_dim, cfg.embedding_size, cfg.lstm_size, cfg.num_classes, cfg.drop_rate) == (
        2048,
        1024,
        512,
        3396,
        0.5,
    )
    assert AttentionLSTMConfig.from_model_section(config.model, feature_dim=512).feature_dim == 512
