"""The fast CPU path (Paddle Inference + oneDNN) computes what the dygraph model computes."""

import numpy as np
import paddle
import pytest

from vtplatform.inference import frame_engine
from vtplatform.models.tsn import FrameFeatures, TSNConfig, load_backbone
from vtplatform.video.transforms import normalize


def test_cpu_engine_matches_dygraph_on_uint8_frames():
    model, _ = load_backbone(TSNConfig(18), None, seed=1)
    frames = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    engine = frame_engine(model, "cpu", "float32", threads=2)
    fast = engine(frames)
    with paddle.no_grad():
        x = paddle.to_tensor(normalize(frames, model.config.image_mean, model.config.image_std))
        slow = model(x).numpy()
        on_device = FrameFeatures(model)(paddle.to_tensor(frames)).numpy()
    assert fast.shape == (3, 512)
    np.testing.assert_allclose(on_device, slow, rtol=1e-5, atol=1e-5)  # in-graph normalisation = numpy's
    np.testing.assert_allclose(fast, slow, rtol=1e-3, atol=1e-3 * np.abs(slow).max())
    assert np.abs(fast - fast[::-1][::-1]).max() == 0 and not np.allclose(fast[0], fast[1])


def test_float16_needs_a_gpu():
    model, _ = load_backbone(TSNConfig(18), None)
    with pytest.raises(ValueError, match="GPU"):
        frame_engine(model, "cpu", "float16", threads=1)
