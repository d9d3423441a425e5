"""Serving export: ``paddle.jit.save`` models of TSN and AttentionLSTM for Paddle Inference.

Layout under ``save_dir``::

    tsn/model.json, model.pdiparams              uint8 RGB crops (N, 224, 224, 3) -> features (N, C)
    attention_lstm/model.json, model.pdiparams   features (B, seg, C) float32 -> probabilities (B, classes)
    export.json                                  what was exported: depth, segments, dims, fingerprints, inputs

The TSN graph normalises on the device (only uint8 crosses the host link). The AttentionLSTM
graph runs VideoTag's recurrence with plain Paddle ops over the fixed ``seg`` steps that TSN
produces (VideoTag always fed 300), so it needs neither LoD tensors nor the legacy kernel.
Crops come from ``vtplatform.video.reader.read_frames`` with ``infer_plan``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Any

import paddle
from paddle import nn

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError
from vtplatform.inference import export_model, program_file
from vtplatform.models.attention_lstm import build_model, load_state
from vtplatform.models.tsn import FrameFeatures, TSNConfig, load_backbone
from vtplatform.models.weights import fingerprint
from vtplatform.stages.lstm import resolve_model
from vtplatform.stages.tsn import weights_fingerprint

log = logging.getLogger(__name__)

MANIFEST = "export.json"
SIGMOID_LOW, SIGMOID_HIGH = -40.0, 13.0  # Paddle's activation clips inside the lstm op
TANH_LOW = -20.0  # tanh(a) = 2 / (1 + exp(min(-2a, 40))) - 1


def _sigmoid(x: paddle.Tensor) -> paddle.Tensor:
    return nn.functional.sigmoid(paddle.clip(x, SIGMOID_LOW, SIGMOID_HIGH))


def _tanh(x: paddle.Tensor) -> paddle.Tensor:
    return paddle.tanh(paddle.clip(x, min=TANH_LOW))


class AttentionLSTMServing(nn.Layer):
    """A loaded ``AttentionLSTM`` as a static-friendly graph over ``num_segments`` full steps:
    features (B, seg, D) -> probabilities (B, classes)."""

    def __init__(self, model, num_segments: int):
        super().__init__()
        self.model = model
        self.num_segments = num_segments
        self.keep = 1.0 - model.config.drop_rate  # dropout "downscale_in_infer"

    def _direction(self, emb: paddle.Tensor, fc: nn.Linear, lstm, reverse: bool) -> paddle.Tensor:
        h_size = self.model.config.lstm_size
        proj = fc(emb)  # (B, T, 4H)
        bias = lstm.bias.reshape([-1])
        gate_bias, w_ic, w_fc, w_oc = (
            bias[: 4 * h_size],
            bias[4 * h_size : 5 * h_size],
            bias[5 * h_size : 6 * h_size],
            bias[6 * h_size :],
        )
        h = paddle.zeros([emb.shape[0], h_size], dtype=emb.dtype)
        c = paddle.zeros([emb.shape[0], h_size], dtype=emb.dtype)
        outputs = [None] * self.num_segments
        steps = range(self.num_segments - 1, -1, -1) if reverse else range(self.num_segments)
        for t in steps:
            g = proj[:, t] + paddle.matmul(h, lstm.weight) + gate_bias  # blocks c~ | i | f | o
            g_c, g_i, g_f, g_o = paddle.split(g, 4, axis=1)
            i = _sigmoid(g_i + c * w_ic)
            f = _sigmoid(g_f + c * w_fc)
            c = _tanh(g_c) * i + c * f
            o = _sigmoid(g_o + c * w_oc)  # the output gate sees the new cell
            h = o * _tanh(c)
            outputs[t] = h
        return paddle.stack(outputs, axis=1)  # (B, T, H), row t for input step t

    def forward(self, features: paddle.Tensor) -> paddle.Tensor:
        m = self.model
        emb = paddle.tanh(m.rgb_fc(features))  # (B, T, E)
        h_fwd = self._direction(emb, m.rgb_fc_forward, m.rgb_lstm_forward, reverse=False)
        h_bwd = self._direction(emb, m.rgb_fc_backward, m.rgb_lstm_backward, reverse=True)
        drop = paddle.concat([h_fwd, h_bwd], axis=-1) * self.keep  # (B, T, 2H)
        att = nn.functional.softmax(m.rgb_weight(drop).squeeze(-1), axis=1)  # (B, T)
        pooled = paddle.sum(drop * att.unsqueeze(-1), axis=1)  # (B, 2H)
        fc2 = paddle.tanh(m.fc2(nn.functional.relu(m.fc1(pooled))))
        return nn.functional.sigmoid(m.output(fc2))


def _save(layer: nn.Layer, spec: list, save_dir: str, name: str, config: Config) -> str:
    """jit.save into a local temp folder, then copy to ``save_dir/name`` (local or S3)."""
    layer.eval()
    fs, root = st.filesystem(save_dir, config.storage)
    with tempfile.TemporaryDirectory(prefix="vtp-export-") as tmp:
        prefix = export_model(layer, spec, tmp)
        for path in (program_file(prefix), prefix + ".pdiparams"):
            with open(path, "rb") as f:
                st.write_bytes(f.read(), fs, f"{root}/{name}/{os.path.basename(path)}")
    return f"{save_dir.rstrip('/')}/{name}/model"


def export_tsn(config: Config, weights: str | None, save_dir: str) -> dict[str, Any]:
    tsn_config = TSNConfig.from_model_section(config.model)
    fingerprint, _ = weights_fingerprint(config, weights)
    with st.local_copy(weights, config.storage) if weights else contextlib.nullcontext() as local:
        backbone, _ = load_backbone(tsn_config, local, config.extract.seed)
    spec = [paddle.static.InputSpec([None, config.infer.target_size, config.infer.target_size, 3], "uint8", "frames")]
    path = _save(FrameFeatures(backbone), spec, save_dir, S.EXPORT_TSN_DIR, config)
    return {"path": st.redact(path), "depth": tsn_config.depth, "feature_dim": tsn_config.feature_dim, "weights": fingerprint,
            "input": "frames uint8 (N, 224, 224, 3) RGB crops", "output": "features float32 (N, C)"}  # fmt: skip


def export_lstm(config: Config, weights: str, save_dir: str, feature_dim: int) -> dict[str, Any]:
    model_config, loaded = resolve_model(config, weights, feature_dim)
    model = build_model(model_config)
    load_state(model, loaded.state, loaded.source)
    seg = config.infer.seg_num
    spec = [paddle.static.InputSpec([None, seg, model_config.feature_dim], "float32", "features")]
    path = _save(AttentionLSTMServing(model, seg), spec, save_dir, S.EXPORT_LSTM_DIR, config)
    return {"path": st.redact(path), "num_segments": seg, "feature_dim": model_config.feature_dim,
            "num_classes": model_config.num_classes, "weights": fingerprint(sorted(loaded.state.items())),
            "input": f"features float32 (B, {seg}, {model_config.feature_dim})", "output": "probabilities (B, classes)"}  # fmt: skip


def run_export(
    config: Config, save_dir: str, tsn_weights: str | None = None, lstm_weights: str | None = None
) -> dict[str, Any]:
    """Exports TSN for MODEL.name TSN, AttentionLSTM for AttentionLSTM, and both for VideoTag."""
    name = config.model.name
    manifest: dict[str, Any] = {"model": name, "segments": config.infer.seg_num}
    if name in ("TSN", "VideoTag"):
        manifest["tsn"] = export_tsn(config, tsn_weights, save_dir)
    if name in ("AttentionLSTM", "VideoTag"):
        if not lstm_weights:
            raise ConfigError("exporting the AttentionLSTM needs its weights")
        dim = manifest["tsn"]["feature_dim"] if "tsn" in manifest else config.model.feature_dims[0]
        if name == "VideoTag":
            dim = TSNConfig.from_model_section(config.model).feature_dim
        manifest["attention_lstm"] = export_lstm(config, lstm_weights, save_dir, dim)
    fs, root = st.filesystem(save_dir, config.storage)
    st.write_bytes(json.dumps(manifest, indent=1).encode(), fs, f"{root}/{MANIFEST}")
    return manifest
