"""The TSN classifier VideoTag trained: ResNet features averaged over segments, then one fc.

As in PaddleCV's ``TSN_ResNet.net``: global-average-pooled frame features are reshaped to
(B, seg, C), averaged over the segments, and fed to an fc over ``num_classes`` whose weight is
initialised uniform in ±1/sqrt(C) and whose bias starts at 0; softmax and cross-entropy on top.
The fc keeps its fluid names (``fc_0.w_0`` [C, classes], ``fc_0.b_0``), so checkpoints stay in
the official naming. Frames enter as uint8 RGB and are normalised on the device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import paddle
from paddle import nn

from vtplatform.models import weights as wts
from vtplatform.models.tsn import IMAGENET_MEAN, IMAGENET_STD, ResNet, TSNConfig, fluid_name_map

log = logging.getLogger(__name__)

FC_WEIGHT, FC_BIAS = "fc_0.w_0", "fc_0.b_0"


@dataclass(frozen=True)
class TSNClassifierConfig:
    depth: int = 101
    num_classes: int = 400
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"MODEL.num_classes must be >= 1, got {self.num_classes}")

    @classmethod
    def from_model_section(cls, model) -> TSNClassifierConfig:
        """From the config's MODEL section: the backbone's keys plus ``num_classes``."""
        backbone = TSNConfig.from_model_section(model)
        return cls(backbone.depth, model.num_classes, backbone.image_mean, backbone.image_std)

    @property
    def backbone(self) -> TSNConfig:
        return TSNConfig(self.depth, self.image_mean, self.image_std)


class TSNClassifier(nn.Layer):
    """uint8 RGB segments (B, seg, H, W, 3) -> class logits (B, num_classes)."""

    def __init__(self, config: TSNClassifierConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNet(config.backbone)
        dim = config.backbone.feature_dim
        stdv = 1.0 / math.sqrt(dim)
        self.fc = nn.Linear(
            dim,
            config.num_classes,
            weight_attr=paddle.ParamAttr(initializer=nn.initializer.Uniform(-stdv, stdv)),
            bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)),
        )
        self.register_buffer(
            "mean", paddle.to_tensor(config.image_mean, dtype="float32").reshape([1, 3, 1, 1]), persistable=False
        )
        self.register_buffer(
            "std", paddle.to_tensor(config.image_std, dtype="float32").reshape([1, 3, 1, 1]), persistable=False
        )
        self.register_buffer("scale", paddle.full([1], 255.0, dtype="float32"), persistable=False)

    def forward(self, frames: paddle.Tensor) -> paddle.Tensor:
        seg, h, w = frames.shape[1], frames.shape[2], frames.shape[3]  # static, also when exported
        x = frames.reshape([-1, h, w, 3]).astype("float32").transpose([0, 3, 1, 2]) / self.scale  # (B*seg, 3, H, W)
        x = (x - self.mean) / self.std
        feats = self.backbone(x).reshape([-1, seg, self.config.backbone.feature_dim])  # (B, seg, C)
        return self.fc(feats.mean(axis=1))  # (B, num_classes)


class TSNProbabilities(nn.Layer):
    """The inference graph: uint8 segments (B, seg, H, W, 3) -> softmax probabilities (B, num_classes)."""

    def __init__(self, classifier: TSNClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, frames: paddle.Tensor) -> paddle.Tensor:
        return nn.functional.softmax(self.classifier(frames), axis=-1)


def name_map(model: TSNClassifier) -> dict[str, str]:
    """{fluid name: state_dict key}: the backbone's official names, then the fc."""
    mapping = {name: f"backbone.{key}" for name, key in fluid_name_map(model.backbone).items()}
    mapping[FC_WEIGHT] = "fc.weight"
    mapping[FC_BIAS] = "fc.bias"
    return mapping


def is_head(name: str) -> bool:
    """Classifier-head entries of a weight file: ``fc_0.w_0`` (VideoTag, PaddleClas), ``fc_weights`` ..."""
    return name.startswith("fc_") or name.startswith("fc.")


def load_pretrained(model: TSNClassifier, state: Mapping[str, np.ndarray]) -> list[str]:
    """Fine-tuning start: loads every backbone parameter from ``state`` (official VideoTag TSN,
    an ImageNet ResNet in fluid names, or one of our checkpoints), drops whatever head the file
    has, and keeps the freshly initialised fc. Returns the dropped head entries."""
    mapping = name_map(model)
    dropped = sorted(n for n in state if is_head(n))
    wts.assign(model, state, mapping, skip=(FC_WEIGHT, FC_BIAS))
    shapes = ", ".join(f"{n} {list(np.shape(state[n]))}" for n in dropped) or "none in the file"
    log.info(
        "pretrained backbone loaded; old classifier head dropped (%s); "
        "new fc initialised for %d classes (uniform ±1/sqrt(%d), bias 0)",
        shapes,
        model.config.num_classes,
        model.config.backbone.feature_dim,
    )
    return dropped


def load_weights(model: TSNClassifier, state: Mapping[str, np.ndarray]) -> None:
    """Evaluation / prediction / resume: every parameter, the fc included, must be in ``state``."""
    if FC_WEIGHT not in state:
        raise wts.WeightsError(
            f"the weights have no classifier head ({FC_WEIGHT}): they are a backbone-only file; "
            "fine-tune them with --pretrain first, or pass a TSN classifier checkpoint"
        )
    unused = wts.assign(model, state, name_map(model))
    if unused:
        log.info("TSN classifier weights: ignored %d entries (e.g. %s)", len(unused), unused[:3])


def build(config: TSNClassifierConfig, seed: int = 0) -> TSNClassifier:
    """A freshly initialised classifier, identical in every process for the same seed."""
    paddle.seed(seed)
    return TSNClassifier(config)


def state_in_fluid_names(model: TSNClassifier) -> dict[str, np.ndarray]:
    params = model.state_dict()
    return {name: params[key].numpy() for name, key in name_map(model).items()}


def fingerprint(model: TSNClassifier) -> str:
    return wts.model_fingerprint(model, name_map(model))
