"""The TSN classifier: VideoTag's backbone, segment averaging, fc; weights in fluid names."""

import importlib.util
import logging
import pickle

import numpy as np
import paddle
import pytest

from tests.conftest import GOLDEN
from vtplatform.models import tsn_classifier as tc
from vtplatform.models import weights as W
from vtplatform.models.tsn import fluid_name_map
from vtplatform.video.transforms import normalize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _small(num_classes=4, seed=0):
    model = tc.build(tc.TSNClassifierConfig(depth=18, num_classes=num_classes), seed=seed)
    model.eval()
    return model


def _frames(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_names_are_the_backbone_fluid_names_plus_fc_0():
    model = _small()
    mapping = tc.name_map(model)
    backbone = fluid_name_map(model.backbone)
    assert list(mapping)[: len(backbone)] == list(backbone)
    assert list(mapping)[-2:] == ["fc_0.w_0", "fc_0.b_0"]
    state = tc.state_in_fluid_names(model)
    assert state["fc_0.w_0"].shape == (512, 4)  # fluid fc layout [in, out]
    assert len(mapping) == len(model.state_dict())


def test_new_fc_is_uniform_within_one_over_sqrt_dim_and_bias_zero():
    model = tc.build(tc.TSNClassifierConfig(depth=50, num_classes=300))
    w, b = model.fc.weight.numpy(), model.fc.bias.numpy()
    bound = 1 / np.sqrt(2048)
    assert w.shape == (2048, 300)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(float(w.mean())) < 0.05 * bound
    assert np.all(b == 0)


def test_logits_are_the_fc_of_segment_averaged_features():
    model = _small()
    frames = _frames((2, 3, 64, 64, 3))
    x = normalize(frames.reshape(-1, 64, 64, 3), MEAN, STD)
    with paddle.no_grad():
        feats = model.backbone(paddle.to_tensor(x)).numpy().reshape(2, 3, -1)
        logits = model(paddle.to_tensor(frames)).numpy()
    expected = feats.mean(axis=1) @ model.fc.weight.numpy() + model.fc.bias.numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # segment order does not matter, and a repeated segment averages to itself
    with paddle.no_grad():
        permuted = model(paddle.to_tensor(frames[:, ::-1].copy())).numpy()
        single = model(paddle.to_tensor(frames[:, :1])).numpy()
        repeated = model(paddle.to_tensor(np.repeat(frames[:, :1], 3, axis=1))).numpy()
    np.testing.assert_allclose(permuted, logits, atol=1e-5)
    np.testing.assert_allclose(repeated, single, atol=1e-5)


def test_probabilities_graph_is_the_softmax():
    model = _small()
    frames = paddle.to_tensor(_frames((3, 2, 64, 64, 3)))
    with paddle.no_grad():
        probs = tc.TSNProbabilities(model)(frames).numpy()
        logits = model(frames).numpy()
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), atol=1e-6)


def _golden_tsn_weights():
    spec = importlib.util.spec_from_file_location("make_tsn_weights", GOLDEN / "make_tsn_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.make_tsn_weights())


def test_official_videotag_tsn_file_gives_golden_features_through_the_classifier(tmp_path, caplog):
    """The official backbone (no head in the file) loads; the uint8 input path reproduces the golden features."""
    path = tmp_path / "tsn.pdparams"
    with open(path, "wb") as f:
        pickle.dump(_golden_tsn_weights(), f, protocol=2)
    model = tc.build(tc.TSNClassifierConfig(depth=101, num_classes=7), seed=1)
    fc_before = model.fc.weight.numpy().copy()
    with caplog.at_level(logging.INFO):
        dropped = tc.load_pretrained(model, W.read_state(path))
    assert dropped == []
    assert "new fc initialised for 7 classes" in caplog.text
    np.testing.assert_array_equal(model.fc.weight.numpy(), fc_before)
    model.eval()
    demo = np.load(GOLDEN / "preprocess_demo.npz")["frames_crop_uint8"][[0, 3]]  # positions 0 and 150
    golden = np.load(GOLDEN / "tsn_r101.npz")["features_demo"][0]  # (2, 2048)
    with paddle.no_grad():
        logits = model(paddle.to_tensor(demo[None])).numpy()[0]
    expected = golden.mean(axis=0) @ fc_before + model.fc.bias.numpy()
    np.testing.assert_allclose(logits, expected, atol=2e-3)


def test_imagenet_head_is_dropped_and_logged(caplog):
    source = _small(num_classes=3, seed=5)
    state = tc.state_in_fluid_names(source)
    del state["fc_0.w_0"], state["fc_0.b_0"]
    state["fc_0.w_0"] = np.ones((512, 1000), np.float32)  # PaddleClas ImageNet head
    state["fc_0.b_0"] = np.ones((1000,), np.float32)
    model = _small(num_classes=3, seed=9)
    fresh = model.fc.weight.numpy().copy()
    with caplog.at_level(logging.INFO):
        dropped = tc.load_pretrained(model, state)
    assert dropped == ["fc_0.b_0", "fc_0.w_0"]
    assert "fc_0.w_0 [512, 1000]" in caplog.text and "dropped" in caplog.text
    np.testing.assert_array_equal(model.fc.weight.numpy(), fresh)
    np.testing.assert_array_equal(model.backbone.conv1.conv.weight.numpy(), source.backbone.conv1.conv.weight.numpy())


def test_own_checkpoint_head_is_dropped_for_fine_tuning_but_kept_for_evaluation():
    source = _small(num_classes=3, seed=5)
    state = tc.state_in_fluid_names(source)
    tuned = _small(num_classes=3, seed=9)
    tc.load_pretrained(tuned, state)
    assert not np.array_equal(tuned.fc.weight.numpy(), source.fc.weight.numpy())
    evaluated = _small(num_classes=3, seed=9)
    tc.load_weights(evaluated, state)
    np.testing.assert_array_equal(evaluated.fc.weight.numpy(), source.fc.weight.numpy())
    assert tc.fingerprint(evaluated) == tc.fingerprint(source)


def test_evaluation_needs_a_head_of_the_right_size():
    backbone_only = {k: v for k, v in tc.state_in_fluid_names(_small()).items() if not k.startswith("fc_")}
    with pytest.raises(W.WeightsError, match="no classifier head"):
        tc.load_weights(_small(), backbone_only)
    with pytest.raises(W.WeightsError, match=r"fc_0.w_0: file has shape \[512, 4\], model expects \[512, 6\]"):
        tc.load_weights(_small(num_classes=6), tc.state_in_fluid_names(_small(num_classes=4)))
