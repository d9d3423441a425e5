"""The TSN backbone against the original VideoTag graph (golden fixtures, official fluid names)."""

import importlib.util
import json
import logging
import pickle

import numpy as np
import paddle
import pytest

from tests.conftest import GOLDEN, SEED
from vtplatform.inference import frame_engine
from vtplatform.models import weights as W
from vtplatform.models.tsn import ResNet, TSNConfig, TSNExtractor, fluid_name_map, load_backbone
from vtplatform.video.transforms import normalize


def _golden_weights_module():
    spec = importlib.util.spec_from_file_location("make_tsn_weights", GOLDEN / "make_tsn_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """The golden synthetic weights, written as fluid 1.8 wrote them: a protocol-2 pickle of {fluid name: array}."""
    path = tmp_path_factory.mktemp("w") / "tsn.pdparams"
    with open(path, "wb") as f:
        pickle.dump(dict(_golden_weights_module().make_tsn_weights()), f, protocol=2)
    return path


@pytest.fixture(scope="module")
def r101(official_file):
    return load_backbone(TSNConfig(101), str(official_file))


def test_parameter_names_and_order_match_the_official_file():
    names = [ln.strip() for ln in (SEED / "tsn_r101_param_names.txt").read_text().splitlines() if ln.strip()]
    shapes = json.loads((GOLDEN / "tsn_r101_official_shapes.json").read_text())["params"]
    model = ResNet(TSNConfig(101))
    mapping = fluid_name_map(model)
    assert list(mapping) == names
    state = model.state_dict()
    for p in shapes:
        assert list(state[mapping[p["name"]]].shape) == p["shape"], p["name"]


def test_fingerprint_of_loaded_weights_matches_golden(r101):
    _, fingerprint = r101
    assert fingerprint == str(np.load(GOLDEN / "tsn_r101.npz")["weights_sha256"])


@pytest.mark.parametrize(("inp", "out"), [("input", "features"), ("input_demo", "features_demo")])
def test_reproduces_golden_features(r101, inp, out):
    model, _ = r101
    g = np.load(GOLDEN / "tsn_r101.npz")
    extractor = TSNExtractor.__new__(TSNExtractor)  # the backbone already loaded, wrapped as the extractor
    paddle.nn.Layer.__init__(extractor)
    extractor.config, extractor.backbone = model.config, model
    with paddle.no_grad():
        feats = extractor(paddle.to_tensor(g[inp])).numpy()
    assert feats.shape == (1, 2, 2048)
    np.testing.assert_allclose(feats, g[out], atol=1e-3)  # max |feature| is about 67


def test_stage_outputs_match_golden(r101):
    model, _ = r101
    g = np.load(GOLDEN / "tsn_r101.npz")
    x = paddle.to_tensor(g["input"].reshape(-1, 3, 224, 224))
    with paddle.no_grad():
        x = model.pool(model.conv1(x))
        res2 = model.res2(x)
        np.testing.assert_allclose(res2.mean(axis=[2, 3]).numpy(), g["stage_mean_res2c"], atol=1e-4)
        res5 = model.res5(model.res4(model.res3(res2)))
    np.testing.assert_allclose(res5.numpy()[:, :8], g["res5c_out_corner"], atol=1e-3)


def test_cpu_engine_that_extraction_runs_reproduces_golden_features(r101):
    """Paddle Inference with oneDNN, fed the uint8 crops extraction feeds it (normalised in the
    graph): the golden synthetic frames (8-bit quantised, so they invert exactly) and the 2 real
    demo frames (``preprocess_demo.npz``'s exact crops at positions 0 and 150)."""
    model, _ = r101
    g = np.load(GOLDEN / "tsn_r101.npz")
    mean = np.asarray(model.config.image_mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(model.config.image_std, np.float32).reshape(1, 3, 1, 1)
    synthetic = np.rint((g["input"][0] * std + mean) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    demo = np.load(GOLDEN / "preprocess_demo.npz")
    positions = demo["keep_positions"].tolist()
    real = demo["frames_crop_uint8"][[positions.index(0), positions.index(150)]]
    for crops, inp in ((synthetic, "input"), (real, "input_demo")):  # the crops are the golden inputs, exactly
        np.testing.assert_array_equal(normalize(crops, model.config.image_mean, model.config.image_std), g[inp][0])
    engine = frame_engine(model, "cpu", "float32", threads=2)
    for crops, out in ((synthetic, "features"), (real, "features_demo")):
        feats = engine(crops)
        assert feats.shape == (2, 2048) and feats.dtype == np.float32
        np.testing.assert_allclose(feats, g[out][0], atol=1e-3)  # the golden tolerance; max |feature| is about 67


@pytest.mark.parametrize(("depth", "dim"), [(18, 512), (34, 512), (50, 2048), (152, 2048)])
def test_depths_and_feature_dims(depth, dim):
    model = ResNet(TSNConfig(depth))
    model.eval()
    with paddle.no_grad():
        out = model(paddle.zeros([2, 3, 64, 64]))
    assert out.shape == [2, dim]
    assert TSNConfig(depth).feature_dim == dim
    assert len(fluid_name_map(model)) == len(model.state_dict())  # every parameter has a fluid name


def test_rejects_unknown_depth():
    with pytest.raises(ValueError, match="num_layers"):
        TSNConfig(77)


def test_config_from_the_model_section():
    from tests.conftest import ROOT
    from vtplatform.config import load_config

    model = load_config(ROOT / "configs" / "tsn.yaml", ["MODEL.num_layers=18", "MODEL.image_mean=[0.5,0.4,0.3]"]).model
    config = TSNConfig.from_model_section(model)
    assert config == TSNConfig(18, (0.5, 0.4, 0.3), tuple(model.image_std)) and config.feature_dim == 512
    with pytest.raises(ValueError, match="num_layers"):
        TSNConfig.from_model_section(load_config(ROOT / "configs" / "tsn.yaml", ["MODEL.num_layers=77"]).model)


def test_loads_its_own_saved_weights(tmp_path):
    model, fp = load_backbone(TSNConfig(18), None, seed=3)
    assert fp == W.RANDOM_INIT
    path = tmp_path / "mine.pdparams"
    W.save_state(model, fluid_name_map(model), path)
    again, fp2 = load_backbone(TSNConfig(18), str(path))
    assert fp2 == W.model_fingerprint(model, fluid_name_map(model))
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype("float32"))
    with paddle.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), again(x).numpy())


def test_random_init_is_seeded_and_warns(caplog):
    with caplog.at_level(logging.WARNING):
        a, fp = load_backbone(TSNConfig(18), None, seed=0)
    assert fp == "random-init"
    assert "random init" in caplog.text
    b, _ = load_backbone(TSNConfig(18), None, seed=0)
    c, _ = load_backbone(TSNConfig(18), None, seed=1)
    wa, wb, wc = (m.conv1.conv.weight.numpy() for m in (a, b, c))
    np.testing.assert_array_equal(wa, wb)  # every actor of a cluster builds the same random model
    assert not np.array_equal(wa, wc)


def test_imagenet_style_file_loads_and_ignores_the_head(tmp_path, caplog):
    model, _ = load_backbone(TSNConfig(18), None, seed=5)
    state = {name: model.state_dict()[key].numpy() for name, key in fluid_name_map(model).items()}
    state["fc_0.w_0"] = np.zeros((512, 1000), np.float32)
    state["fc_0.b_0"] = np.zeros((1000,), np.float32)
    path = tmp_path / "imagenet.pdparams"
    paddle.save(state, str(path))  # paddle.save format, as PaddleClas ships
    with caplog.at_level(logging.INFO):
        loaded, _ = load_backbone(TSNConfig(18), str(path))
    assert "fc_0" in caplog.text
    np.testing.assert_array_equal(loaded.conv1.conv.weight.numpy(), model.conv1.conv.weight.numpy())


def test_wrong_files_give_clear_errors(tmp_path):
    model, _ = load_backbone(TSNConfig(18), None)
    state = {name: model.state_dict()[key].numpy() for name, key in fluid_name_map(model).items()}
    missing = dict(state)
    del missing["res3a_branch1_weights"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(W.WeightsError, match="missing"):
        load_backbone(TSNConfig(18), str(tmp_path / "missing.npz"))
    with pytest.raises(W.WeightsError, match="missing"):  # a ResNet-18 file for a ResNet-50
        np.savez(tmp_path / "r18.npz", **state)
        load_backbone(TSNConfig(50), str(tmp_path / "r18.npz"))
    with pytest.raises(W.WeightsError, match=r"conv1_weights: file has shape \[64, 3, 3, 3\]"):
        np.savez(tmp_path / "bad_shape.npz", **{**state, "conv1_weights": np.zeros((64, 3, 3, 3), np.float32)})
        load_backbone(TSNConfig(18), str(tmp_path / "bad_shape.npz"))
    with pytest.raises(W.WeightsError, match="not found"):
        load_backbone(TSNConfig(18), str(tmp_path / "nope.pdparams"))
