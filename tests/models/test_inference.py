"""The fast CPU path (Paddle Inference + oneDNN) computes what the dygraph model computes, and
says nothing of Paddle's internals on the way."""

import subprocess
import sys

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
    assert not np.allclose(fast[0], fast[1])
    # each frame's features depend on that frame alone: permuted frames give the rows permuted, and
    # a frame run by itself gives its row (the engine batches nothing across frames)
    tol = {"rtol": 1e-5, "atol": 1e-5 * np.abs(fast).max()}
    np.testing.assert_allclose(engine(frames[[2, 0, 1]]), fast[[2, 0, 1]], **tol)
    for i in range(3):
        np.testing.assert_allclose(engine(frames[i : i + 1])[0], fast[i], **tol)


def test_float16_needs_a_gpu():
    model, _ = load_backbone(TSNConfig(18), None)
    with pytest.raises(ValueError, match="GPU"):
        frame_engine(model, "cpu", "float16", threads=1)


def test_dygraph_runtime_matches_the_exported_one():
    model, _ = load_backbone(TSNConfig(18), None, seed=2)
    frames = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    exported = frame_engine(model, "cpu", "float32", threads=1)(frames)
    dygraph = frame_engine(model, "cpu", "float32", threads=1, runtime="dygraph")(frames)
    np.testing.assert_allclose(dygraph, exported, rtol=1e-3, atol=1e-3 * np.abs(exported).max())


@pytest.mark.gpu
def test_float16_on_gpu_is_close_to_float32():
    model, _ = load_backbone(TSNConfig(50), None, seed=3)
    frames = np.random.default_rng(2).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    fp32 = frame_engine(model, "gpu", "float32", threads=1)(frames)
    fp16 = frame_engine(model, "gpu", "float16", threads=1)(frames)
    assert fp16.dtype == np.float32
    np.testing.assert_allclose(fp16, fp32, rtol=2e-2, atol=2e-2 * np.abs(fp32).max())


NOISE_RUN = """
import os, numpy as np
from vtplatform.inference import frame_engine, paddle_noise_filtered
from vtplatform.models.tsn import TSNConfig, load_backbone

engine = frame_engine(load_backbone(TSNConfig(18), None)[0], "cpu", "float32", threads=1)
engine(np.zeros((1, 224, 224, 3), np.uint8))
with paddle_noise_filtered():
    os.write(1, b"ReduceMeanCheckIfOneDNNSupport\\nstdout written from C kept\\n")
    os.write(2, b"W0101 a real glog warning kept\\n")
    print("a print kept", flush=True)
print("after", flush=True)
"""


def test_paddle_noise_is_dropped_and_every_other_line_kept():
    """A fresh process (Paddle's PIR warning comes once a process) imports vtplatform, exports and
    first runs the TSN model: none of Paddle's known noise reaches its stdout or stderr, while
    other lines written meanwhile, from C or Python, come through in order."""
    from tests.conftest import ROOT
    from vtplatform.inference import PADDLE_NOISE

    res = subprocess.run([sys.executable, "-c", NOISE_RUN], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for noise in (*PADDLE_NOISE, "No ccache found"):
        assert noise not in res.stdout + res.stderr, noise
    assert res.stdout.splitlines()[-3:] == ["stdout written from C kept", "a print kept", "after"], res.stdout
    assert "W0101 a real glog warning kept" in res.stderr
