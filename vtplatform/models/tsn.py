"""TSN ResNet backbone (VideoTag's feature extractor) in Paddle dygraph.

ResNet "v1.5": the stride of a bottleneck sits on its 3x3 conv. Every conv is followed by a
batch norm with eps 1e-5. Sublayers carry the fluid names of the original program
(``res4b3_branch2a`` ...), so the official VideoTag and ImageNet weight files map onto
this model by name (see ``fluid_name_map``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import paddle
from paddle import nn

from vtplatform.models import weights as wts

log = logging.getLogger(__name__)

STAGE_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TSNConfig:
    depth: int = 101
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.depth not in STAGE_DEPTHS:
            raise ValueError(f"MODEL.num_layers must be one of {sorted(STAGE_DEPTHS)}, got {self.depth}")

    @classmethod
    def from_model_section(cls, model) -> TSNConfig:
        """From the config's MODEL section (``num_layers``, ``image_mean``, ``image_std``)."""
        return cls(model.num_layers, tuple(model.image_mean), tuple(model.image_std))

    @property
    def bottleneck(self) -> bool:
        return self.depth >= 50

    @property
    def feature_dim(self) -> int:
        return STAGE_WIDTHS[-1] * (4 if self.bottleneck else 1)


def block_names(depth: int) -> list[list[str]]:
    """Fluid block names per stage: res2a, res2b, ...; res4a, res4b1, res4b2, ... for 101/152."""
    names = []
    for stage, count in enumerate(STAGE_DEPTHS[depth]):
        prefix = f"res{stage + 2}"
        if depth >= 101 and stage == 2:
            names.append([prefix + ("a" if i == 0 else f"b{i}") for i in range(count)])
        else:
            names.append([prefix + chr(ord("a") + i) for i in range(count)])
    return names


class ConvBN(nn.Layer):
    """conv (no bias, 'same' padding) -> batch norm (eps 1e-5) -> optional ReLU."""

    def __init__(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True):
        super().__init__()
        self.fluid_name = name
        self.conv = nn.Conv2D(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, bias_attr=False)
        self.bn = nn.BatchNorm2D(cout, epsilon=1e-5)
        self.relu = relu

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.bn(self.conv(x))
        return nn.functional.relu(x) if self.relu else x


class Bottleneck(nn.Layer):
    expansion = 4

    def __init__(self, name: str, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.branch2a = ConvBN(f"{name}_branch2a", cin, width, 1)
        self.branch2b = ConvBN(f"{name}_branch2b", width, width, 3, stride=stride)  # v1.5: stride on the 3x3
        self.branch2c = ConvBN(f"{name}_branch2c", width, cout, 1, relu=False)
        self.branch1 = (
            ConvBN(f"{name}_branch1", cin, cout, 1, stride, relu=False) if cin != cout or stride != 1 else None
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        shortcut = x if self.branch1 is None else self.branch1(x)
        return nn.functional.relu(shortcut + self.branch2c(self.branch2b(self.branch2a(x))))


class BasicBlock(nn.Layer):
    expansion = 1

    def __init__(self, name: str, cin: int, width: int, stride: int):
        super().__init__()
        self.branch2a = ConvBN(f"{name}_branch2a", cin, width, 3, stride=stride)
        self.branch2b = ConvBN(f"{name}_branch2b", width, width, 3, relu=False)
        self.branch1 = (
            ConvBN(f"{name}_branch1", cin, width, 1, stride, relu=False) if cin != width or stride != 1 else None
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        shortcut = x if self.branch1 is None else self.branch1(x)
        return nn.functional.relu(shortcut + self.branch2b(self.branch2a(x)))


class ResNetStage(nn.Layer):
    def __init__(self, names: list[str], cin: int, width: int, stride: int, bottleneck: bool):
        super().__init__()
        block = Bottleneck if bottleneck else BasicBlock
        blocks = []
        for i, name in enumerate(names):
            blocks.append(block(name, cin, width, stride if i == 0 else 1))
            cin = width * block.expansion
        self.blocks = nn.LayerList(blocks)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ResNet(nn.Layer):
    """Frames (N, 3, 224, 224) normalised -> pooled features (N, feature_dim)."""

    def __init__(self, config: TSNConfig):
        super().__init__()
        self.config = config
        self.conv1 = ConvBN("conv1", 3, 64, 7, stride=2)
        self.pool = nn.MaxPool2D(kernel_size=3, stride=2, padding=1)
        names = block_names(config.depth)
        expansion = 4 if config.bottleneck else 1
        cin = 64
        stages = []
        for i, width in enumerate(STAGE_WIDTHS):
            stages.append(ResNetStage(names[i], cin, width, 1 if i == 0 else 2, config.bottleneck))
            cin = width * expansion
        self.res2, self.res3, self.res4, self.res5 = stages

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.pool(self.conv1(x))  # (N, 64, 56, 56)
        x = self.res5(self.res4(self.res3(self.res2(x))))  # (N, C, 7, 7)
        return x.mean(axis=[2, 3])  # (N, C)


class TSNExtractor(nn.Layer):
    """VideoTag's extractor: segments (B, seg, 3, 224, 224) -> features (B, seg, C)."""

    def __init__(self, config: TSNConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNet(config)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        b, seg = x.shape[0], x.shape[1]
        feats = self.backbone(x.reshape([-1, 3, x.shape[-2], x.shape[-1]]))  # (B*seg, C)
        return feats.reshape([b, seg, -1])


class FrameFeatures(nn.Layer):
    """The inference graph: uint8 RGB crops (N, 224, 224, 3) -> features (N, C).

    Normalisation happens on the device so that only uint8 frames cross the host link; the
    arithmetic matches VideoTag's float32 ``/255, -mean, /std`` order exactly.
    """

    def __init__(self, backbone: ResNet):
        super().__init__()
        self.backbone = backbone
        mean = paddle.to_tensor(backbone.config.image_mean, dtype="float32").reshape([1, 3, 1, 1])
        std = paddle.to_tensor(backbone.config.image_std, dtype="float32").reshape([1, 3, 1, 1])
        self.register_buffer("mean", mean, persistable=False)
        self.register_buffer("std", std, persistable=False)
        self.register_buffer("scale", paddle.full([1], 255.0, dtype="float32"), persistable=False)

    def forward(self, frames: paddle.Tensor) -> paddle.Tensor:
        x = frames.astype("float32").transpose([0, 3, 1, 2]) / self.scale  # (N, 3, 224, 224)
        x = (x - self.mean) / self.std
        return self.backbone(x)


def fluid_name_map(model: ResNet) -> dict[str, str]:
    """{fluid parameter name: our state_dict key}, in the original program's creation order."""
    mapping = {}
    for key, layer in model.named_sublayers():
        if not isinstance(layer, ConvBN):
            continue
        name = layer.fluid_name
        bn = "bn_" + name if name == "conv1" else "bn" + name[3:]
        prefix = f"{key}." if key else ""
        mapping[f"{name}_weights"] = f"{prefix}conv.weight"
        mapping[f"{bn}_scale"] = f"{prefix}bn.weight"
        mapping[f"{bn}_offset"] = f"{prefix}bn.bias"
        mapping[f"{bn}_mean"] = f"{prefix}bn._mean"
        mapping[f"{bn}_variance"] = f"{prefix}bn._variance"
    return mapping


def load_backbone(config: TSNConfig, weights: str | None = None, seed: int = 0) -> tuple[ResNet, str]:
    """Builds the backbone in eval mode on the CPU and loads ``weights``.

    ``weights`` may be the official VideoTag TSN file, an ImageNet ResNet file in the same
    fluid naming (its ``fc_*`` head is ignored) or a file we saved. Without weights the model
    is seeded random init, identical in every process, and its fingerprint is "random-init".
    Returns the model and the fingerprint of the loaded weights.
    """
    paddle.seed(seed)
    with paddle.base.dygraph.guard(paddle.CPUPlace()):
        model = ResNet(config)
    model.eval()
    name_map = fluid_name_map(model)
    if weights is None:
        log.warning(
            "No TSN weights given: ResNet-%d runs from random init (seed %d); its features carry no meaning. "
            "Pass --weights with the VideoTag TSN file for real features.",
            config.depth,
            seed,
        )
        return model, wts.RANDOM_INIT
    unused = wts.assign(model, wts.read_state(weights), name_map)
    if unused:
        log.info("TSN weights: ignored %d entries not in the backbone (e.g. %s)", len(unused), unused[:3])
    return model, wts.model_fingerprint(model, name_map)
