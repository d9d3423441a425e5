"""Running a frame model fast: Paddle Inference (oneDNN, N threads) on CPU, dygraph on GPU.

Paddle's dygraph runs CPU ops on one thread unless told otherwise; exporting the graph with
``paddle.jit.save`` and running it through ``paddle.inference`` with oneDNN is several times
faster. On GPU the dygraph model runs directly, optionally under float16 autocast.

Paddle's C++ side writes two lines of its own on the way, straight to the process's file
descriptors: a glog warning that the exported graph's division "not support input out tensor",
and "ReduceMeanCheckIfOneDNNSupport" from the oneDNN mean kernel's first run. Neither says
anything to a user, and every TSN actor printed both. ``paddle_noise_filtered`` drops exactly
those lines (``PADDLE_NOISE``) while a model is exported and first run; every other line written
then, Paddle's or anyone's, is written on once the step is over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

from vtplatform.models.tsn import FrameFeatures

log = logging.getLogger(__name__)

FrameFn = Callable[[np.ndarray], np.ndarray]

# Lines Paddle writes that carry nothing for a user (matched as substrings of a line).
PADDLE_NOISE = (
    "Paddle static graph(PIR) not support input out tensor",  # glog, at a to_static division (the /255)
    "ReduceMeanCheckIfOneDNNSupport",  # stdout, when the oneDNN mean kernel is first chosen
)


@contextlib.contextmanager
def paddle_noise_filtered(noise: tuple[str, ...] = PADDLE_NOISE) -> Iterator[None]:
    """Runs the body with the process's stdout and stderr (file descriptors 1 and 2, where C++
    code writes) going to temporary files, then writes their lines on to the real ones, less those
    that contain a ``noise`` string. Output of the body is delayed, never lost, when it raises."""
    import ctypes

    libc = ctypes.CDLL(None)
    captured = []
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        stream.flush()
        libc.fflush(None)
        saved = os.dup(fd)
        tmp = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
        os.dup2(tmp.fileno(), fd)
        captured.append((fd, stream, saved, tmp))
    try:
        yield
    finally:
        for fd, stream, saved, tmp in captured:
            stream.flush()
            libc.fflush(None)
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().splitlines(keepends=True) if not any(n.encode() in line for n in noise)]
            tmp.close()
            if kept:
                os.write(fd, b"".join(kept))


def export_model(layer, input_spec: list, directory: str, name: str = "model") -> str:
    """``paddle.jit.save`` of ``layer``; returns the path prefix (``directory/name``)."""
    import paddle

    static = paddle.jit.to_static(layer, input_spec=input_spec, full_graph=True)
    prefix = os.path.join(directory, name)
    with paddle_noise_filtered():
        paddle.jit.save(static, prefix)
    return prefix


def program_file(prefix: str) -> str:
    """The saved program: ``.json`` (PIR, Paddle 3) or ``.pdmodel`` (legacy)."""
    for suffix in (".json", ".pdmodel"):
        if os.path.exists(prefix + suffix):
            return prefix + suffix
    raise FileNotFoundError(f"no saved program at {prefix}.json or {prefix}.pdmodel")


class Predictor:
    """A ``paddle.inference`` predictor over one saved model (one input, one output)."""

    def __init__(self, prefix: str, threads: int = 1, use_gpu: bool = False, gpu_id: int = 0):
        import paddle.inference as pi

        config = pi.Config(program_file(prefix), prefix + ".pdiparams")
        if use_gpu:
            config.enable_use_gpu(256, gpu_id)
        else:
            config.disable_gpu()
            config.enable_mkldnn()
            config.set_cpu_math_library_num_threads(threads)
        config.disable_glog_info()
        self._predictor = pi.create_predictor(config)
        self._inputs = [self._predictor.get_input_handle(n) for n in self._predictor.get_input_names()]
        self._output = self._predictor.get_output_handle(self._predictor.get_output_names()[0])
        self._ran = False

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        for handle, array in zip(self._inputs, arrays, strict=True):
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(np.ascontiguousarray(array))
        if self._ran:
            self._predictor.run()
        else:  # the first run chooses the kernels (and says so)
            with paddle_noise_filtered():
                self._predictor.run()
            self._ran = True
        return self._output.copy_to_cpu()


def frame_engine(backbone, device: str, precision: str, threads: int, runtime: str = "auto") -> FrameFn:
    """uint8 crops (N, 224, 224, 3) -> float32 features (N, C): ``engine`` over the backbone.

    ``runtime`` "auto" picks Paddle Inference on CPU and dygraph on GPU; "dygraph" forces the
    dygraph path (float16 autocast needs a GPU either way).
    """
    return engine(FrameFeatures(backbone), [None, 224, 224, 3], device, precision, threads, runtime, "TSN")


def engine(
    layer, input_shape: list, device: str, precision: str, threads: int, runtime: str = "auto", name: str = "model"
) -> FrameFn:
    """A Paddle layer taking one uint8 array of ``input_shape`` (None: any size) as a function of
    numpy arrays: Paddle Inference (oneDNN, ``threads``) on CPU, dygraph on GPU, float16
    autocast with ``precision`` float16 (GPU only)."""
    import paddle

    if precision == "float16" and device == "cpu":
        raise ValueError("float16 inference needs a GPU; use extract.precision=float32 (or auto) on CPU")
    layer.eval()
    if device == "cpu" and runtime != "dygraph":
        spec = [paddle.static.InputSpec(input_shape, "uint8", "frames")]
        with tempfile.TemporaryDirectory(prefix="vtp-export-") as tmp:
            predictor = Predictor(export_model(layer, spec, tmp), threads=threads)
        log.info("%s on CPU through Paddle Inference (oneDNN, %d threads)", name, threads)
        return predictor
    place = paddle.CPUPlace() if device == "cpu" else paddle.CUDAPlace(0)
    layer.to(device=place)
    use_fp16 = precision == "float16"
    log.info("%s on %s in dygraph, %s", name, device, "float16 autocast" if use_fp16 else "float32")

    def run(frames: np.ndarray) -> np.ndarray:
        with paddle.no_grad(), paddle.amp.auto_cast(enable=use_fp16, dtype="float16", level="O1"):
            x = paddle.to_tensor(frames, place=place)
            return layer(x).astype("float32").numpy()

    return run
