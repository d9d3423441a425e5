"""Exported Paddle Inference models compute what the dygraph models compute."""

import json

import numpy as np
import paddle
import pytest

from tests.conftest import ROOT, run_job
from vtplatform.config import load_config
from vtplatform.export import run_export
from vtplatform.inference import Predictor
from vtplatform.models import weights as W
from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map
from vtplatform.models.tsn import FrameFeatures, TSNConfig, load_backbone
from vtplatform.models.tsn import fluid_name_map as tsn_names

SEGMENTS = 6
SMALL = ["MODEL.num_layers=18", f"INFER.seg_num={SEGMENTS}", "MODEL.embedding_size=16", "MODEL.lstm_size=8"]
SMALL += ["MODEL.fc1_size=32", "MODEL.fc2_size=16", "MODEL.num_classes=12", "MODEL.feature_dims=[512]"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    tsn, _ = load_backbone(TSNConfig(18), None, seed=4)
    W.save_state(tsn, tsn_names(tsn), root / "tsn.pdparams")
    lstm = build_model(AttentionLSTMConfig(512, 16, 8, 32, 16, 12), seed=5)
    state = lstm.state_dict()
    rng = np.random.default_rng(3)
    for key in ("rgb_lstm_forward.bias", "rgb_lstm_backward.bias", "output.bias"):  # non-trivial peepholes and outputs
        state[key].set_value(rng.normal(0, 0.5, state[key].shape).astype("float32"))
    W.save_state(lstm, fluid_name_map(lstm), root / "lstm.pdparams")
    return root / "tsn.pdparams", root / "lstm.pdparams", lstm


def test_exported_videotag_matches_dygraph(weights, tmp_path):
    tsn_file, lstm_file, lstm = weights
    config = load_config(ROOT / "configs" / "tag.yaml", SMALL)
    manifest = run_export(config, str(tmp_path / "export"), str(tsn_file), str(lstm_file))
    assert manifest["tsn"]["feature_dim"] == 512 and manifest["attention_lstm"]["num_segments"] == SEGMENTS
    assert json.loads((tmp_path / "export" / "export.json").read_text()) == manifest

    frames = np.random.default_rng(0).integers(0, 256, (SEGMENTS, 224, 224, 3), dtype=np.uint8)
    backbone, _ = load_backbone(TSNConfig(18), str(tsn_file))
    with paddle.no_grad():
        expected_feats = FrameFeatures(backbone)(paddle.to_tensor(frames)).numpy()
    feats = Predictor(str(tmp_path / "export" / "tsn" / "model"), threads=2)(frames)
    np.testing.assert_allclose(feats, expected_feats, rtol=1e-3, atol=1e-3 * np.abs(expected_feats).max())

    x = np.stack([feats, feats[::-1] * 0.5]).astype(np.float32)  # (2, seg, 512)
    lstm.eval()
    with paddle.no_grad():
        logits = lstm(paddle.to_tensor(x), paddle.to_tensor(np.array([SEGMENTS, SEGMENTS]))).numpy()
    expected = 1 / (1 + np.exp(-logits.astype(np.float64)))
    probs = Predictor(str(tmp_path / "export" / "attention_lstm" / "model"), threads=2)(x)
    assert probs.shape == (2, 12)
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    assert not np.allclose(probs[0], probs[1])


def test_export_job_for_one_model(weights, tmp_path):
    tsn_file, _, _ = weights
    args = [
        "--config",
        "configs/tsn.yaml",
        "--weights",
        str(tsn_file),
        "--save_dir",
        str(tmp_path / "e"),
        "-o",
        "MODEL.num_layers=18",
    ]
    res = run_job("export.py", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "e" / "tsn" / "model.pdiparams").exists() and not (tmp_path / "e" / "attention_lstm").exists()
    assert json.loads(res.stdout)["tsn"]["depth"] == 18
