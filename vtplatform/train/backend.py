"""Paddle data-parallel training on Ray Train V2: a ``BackendConfig``/``Backend`` pair.

Usage (any model)::

    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from vtplatform.train.backend import PaddleBackendConfig, setup_paddle

    def train_fn(config: dict) -> None:
        ctx = setup_paddle()                       # first thing in the training function
        model = build_my_model()
        ddp = paddle.DataParallel(model) if ctx.world_size > 1 else model   # averages gradients
        ...

    trainer = DataParallelTrainer(
        train_fn, train_loop_config={...}, backend_config=PaddleBackendConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=N, use_gpu=...), run_config=...)
    trainer.fit()

``PaddleBackend.on_start`` gives every worker the environment of a Paddle collective job
(``PADDLE_TRAINER_ID`` = Ray Train world rank, ``PADDLE_TRAINERS_NUM``, ``PADDLE_TRAINER_ENDPOINTS``,
``PADDLE_CURRENT_ENDPOINT``, ``PADDLE_MASTER`` for the TCP store on rank 0) with gloo on CPU
workers and NCCL on GPU workers. ``setup_paddle`` then runs in the training thread, where Paddle
keeps its process groups: it selects the worker's device and calls
``paddle.distributed.init_parallel_env()`` when there is more than one worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
from ray.train.backend import Backend, BackendConfig

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")


@dataclass
class PaddleBackendConfig(BackendConfig):
    """``backend``: "gloo", "nccl", or None to pick NCCL when workers have GPUs, else gloo."""

    backend: str | None = None

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(
                f"PaddleBackendConfig.backend must be one of {list(BACKENDS)} or None, got {self.backend!r}"
            )

    @property
    def backend_cls(self):
        return PaddleBackend

    @property
    def framework(self) -> str:
        return "paddle"

    def to_dict(self) -> dict:
        return {"backend": self.backend}


@dataclass(frozen=True)
class PaddleContext:
    """What a training function needs to know about its place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "gpu:N"

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def use_gpu(self) -> bool:
        return self.device.startswith("gpu")


def _address_and_port() -> tuple[str, int]:
    from ray.train._internal.utils import get_address_and_port

    return get_address_and_port()


def _set_env(env: dict[str, str]) -> None:
    os.environ.update(env)


class PaddleBackend(Backend):
    # Every GPU of the group stays visible to each worker on a node (NCCL peer-to-peer needs
    # them); each worker picks its own by index in setup_paddle.
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: PaddleBackendConfig) -> None:
        import ray

        gpus = worker_group.get_resources_per_worker().get("GPU", 0) > 0
        backend = backend_config.backend or ("nccl" if gpus else "gloo")
        if backend == "nccl" and not gpus:
            raise ValueError("the NCCL backend needs GPU workers (ScalingConfig(use_gpu=True))")
        n = len(worker_group)
        addresses = ray.get([worker_group.execute_single_async(i, _address_and_port) for i in range(n)])
        endpoints = [f"{ip}:{port}" for ip, port in addresses]
        common = {
            "PADDLE_DISTRI_BACKEND": backend,
            "PADDLE_TRAINERS_NUM": str(n),
            "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
            "PADDLE_MASTER": endpoints[0],
            "PADDLE_WORLD_DEVICE": "gpu" if gpus else "cpu",
        }
        env = [{**common, "PADDLE_TRAINER_ID": str(i), "PADDLE_CURRENT_ENDPOINT": endpoints[i]} for i in range(n)]
        ray.get([worker_group.execute_single_async(i, _set_env, env[i]) for i in range(n)])
        log.info("Paddle %s group of %d workers, master %s", backend, n, endpoints[0])


def setup_paddle(threads: int | None = None) -> PaddleContext:
    """Selects this worker's device and joins the collective group; call it first in the
    training function (Paddle keeps its process group per thread). ``threads``: CPU math threads."""
    import paddle
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    paddle.disable_signal_handler()  # Ray stops workers with SIGTERM; Paddle would report it as a crash
    if threads:
        paddle.base.core.set_num_threads(threads)
    device = "cpu"
    if os.environ.get("PADDLE_WORLD_DEVICE") == "gpu":
        index = _visible_index()
        os.environ["FLAGS_selected_gpus"] = str(index)  # noqa: SIM112 (Paddle's own name)
        device = f"gpu:{index}"
    paddle.set_device(device)
    if world_size > 1:
        paddle.distributed.init_parallel_env()
    log.info("worker %d/%d on %s", rank, world_size, device)
    return PaddleContext(rank=rank, world_size=world_size, local_rank=context.get_local_rank(), device=device)


def _visible_index() -> int:
    """This worker's GPU as an index into CUDA_VISIBLE_DEVICES (shared by the node's workers)."""
    import ray

    own = [str(g) for g in ray.get_gpu_ids()]
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if not own:
        raise RuntimeError("a GPU worker was started without a GPU assigned by Ray")
    return visible.index(own[0]) if own[0] in visible else 0


def all_reduce_sum(values: np.ndarray, world_size: int) -> np.ndarray:
    """Element-wise sum of ``values`` over all workers (a collective: every rank must call it)."""
    if world_size == 1:
        return np.asarray(values)
    import paddle

    tensor = paddle.to_tensor(np.asarray(values, dtype=np.float64))
    paddle.distributed.all_reduce(tensor)
    return tensor.numpy()


def replica_digest(model) -> np.ndarray:
    """sha256 of every trainable parameter (``stop_gradient`` False, in ``model.parameters()``
    order: dtype, shape and raw bytes), as four int64 words. Buffers such as batch-norm running
    statistics are left out: data-parallel workers keep their own."""
    digest = hashlib.sha256()
    for param in model.parameters():
        if param.stop_gradient:
            continue
        value = np.ascontiguousarray(param.numpy())
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(value.tobytes())
    return np.frombuffer(digest.digest(), dtype="<i8").copy()


def check_replicas(model, world_size: int) -> None:
    """Raises RuntimeError if the workers' trainable parameters are not equal bit for bit (a
    collective: every rank calls it). The all-reduced MAX and MIN of ``replica_digest`` differ
    as soon as one element of one parameter differs on one worker."""
    if world_size == 1:
        return
    import paddle

    mine = replica_digest(model)
    high, low = paddle.to_tensor(mine), paddle.to_tensor(mine)
    paddle.distributed.all_reduce(high, op=paddle.distributed.ReduceOp.MAX)
    paddle.distributed.all_reduce(low, op=paddle.distributed.ReduceOp.MIN)
    if not np.array_equal(high.numpy(), low.numpy()):
        raise RuntimeError(
            f"model replicas diverged across {world_size} workers: the sha256 of the trainable parameters differs "
            f"(this worker's begins {mine.tobytes().hex()[:16]}): gradients are not in sync"
        )
