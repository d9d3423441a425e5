"""How big every Ray stage is: sized to the cluster the job finds, or a clear error in seconds.

Every job is one of two shapes:

* a per-video pipeline (extraction, tagging, the frame cache, evaluation and prediction):
  CPU tasks that decode or read -> model actor stages (TSN, AttentionLSTM) -> a writer;
* a fine-tune on Ray Train: N workers, fed by CPU tasks that load their samples.

The sizes in the config (``resources.*``) are upper bounds. On a
cluster with fewer CPUs than they add up to, the model actors share at most half of the CPUs and
the data tasks get the rest, so that every stage can always run at least one task or actor: a
job on a 1-CPU laptop runs slowly instead of waiting forever for a CPU that never frees. The
writer takes no CPU, so finished rows are never starved out of storage. GPUs are never shared
out like that: a job that needs more GPUs than the cluster has fails at once, naming the keys
to change. ``resources.wait_for_resources_s`` lets a job on an autoscaling cluster ask for the
nodes it needs and wait that long for them instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from vtplatform.config import Config, ConfigError

log = logging.getLogger(__name__)

MODEL_SHARE = 0.5  # of a CPU-only cluster's CPUs, at most, for model actors or training workers
STEP = 0.01  # fractional CPU/GPU requests are rounded down to this


@dataclass(frozen=True)
class Cluster:
    """The logical resources of the alive nodes."""

    cpus: float
    gpus: float
    node_cpus: float  # the most CPUs any one node has
    node_gpus: float

    @classmethod
    def find(cls) -> Cluster:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return cls(
            cpus=sum(n.get("CPU", 0.0) for n in nodes),
            gpus=sum(n.get("GPU", 0.0) for n in nodes),
            node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=0.0),
            node_gpus=max((n.get("GPU", 0.0) for n in nodes), default=0.0),
        )

    def describe(self) -> str:
        return f"{self.cpus:g} CPUs and {self.gpus:g} GPUs (at most {self.node_cpus:g} CPUs on one node)"


def device(config: Config, cluster: Cluster, phase_use_gpu: bool = True) -> str:
    """ "gpu" or "cpu": ``resources.use_gpu`` true/false decides; auto means GPUs when the cluster
    has them and the phase (the seed's ``use_gpu``) allows them."""
    choice = str(config.resources.use_gpu).lower()
    if choice == "true":
        if cluster.gpus <= 0:
            raise ConfigError(
                f"resources.use_gpu=true, but the Ray cluster has no GPUs ({cluster.describe()}): "
                "set resources.use_gpu=auto or false, or resources.wait_for_resources_s to wait for GPU nodes"
            )
        return "gpu"
    if choice == "false":
        return "cpu"
    return "gpu" if phase_use_gpu and cluster.gpus > 0 else "cpu"


# --- per-video pipelines ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelNeed:
    """What the config asks for one model stage: per actor, and how many actors at most."""

    name: str
    cpus: float
    gpus: float  # per actor when the job runs on GPUs (0: this stage stays on CPU)
    actors: int
    threads: int | None  # Paddle CPU threads per actor (None: from its CPUs)
    cpus_key: str  # the config keys a user changes, named in messages
    gpus_key: str


@dataclass(frozen=True)
class ActorSizes:
    """One model stage as it will run: an actor pool of ``min_actors``..``max_actors``."""

    name: str
    num_cpus: float
    num_gpus: float
    min_actors: int
    max_actors: int
    threads: int

    def ray_args(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def compute(self):
        from ray.data import ActorPoolStrategy

        return ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors)


@dataclass(frozen=True)
class PipelineSizes:
    device: str  # where the models run
    task_cpus: float  # per decode/read task
    task_concurrency: int | None
    models: dict[str, ActorSizes]
    writer_cpus: float = 0.0

    def describe(self, cluster: Cluster) -> str:
        parts = [f"tasks {self.task_cpus:g} CPU each"]
        for m in self.models.values():
            gpus = f" + {m.num_gpus:g} GPU" if m.num_gpus else ""
            parts.append(
                f"{m.name} {m.min_actors}-{m.max_actors} actors x {m.num_cpus:g} CPU{gpus} ({m.threads} threads)"
            )
        parts.append(f"writer {self.writer_cpus:g} CPU")
        return f"stages on {cluster.describe()}, models on {self.device}: " + "; ".join(parts)


def pipeline_sizes(config: Config, cluster: Cluster, needs: list[ModelNeed], device_: str) -> PipelineSizes:
    """Stage sizes for decode/read tasks feeding ``needs`` (in pipeline order) on ``cluster``."""
    res = config.resources
    _require_cpus(cluster)
    gpus = [n.gpus if device_ == "gpu" else 0.0 for n in needs]
    gpus = _fit_gpus(needs, gpus, cluster) if device_ == "gpu" else gpus
    budget = cluster.cpus * MODEL_SHARE
    cpus = _fit([n.cpus for n in needs], budget, cluster.node_cpus)
    stages: dict[str, ActorSizes] = {}
    spare = max(budget - sum(cpus), 0.0)
    for need, c, g in zip(needs, cpus, gpus, strict=True):
        most = need.actors  # GPU actors beyond the GPUs there are wait for an autoscaler, never block
        if g == 0 and c > 0:  # CPU actors: more only as far as the CPUs kept for models allow
            most = min(most, 1 + int(spare // c))
            spare -= (max(1, most) - 1) * c
        stages[need.name] = ActorSizes(need.name, c, g, 1, max(1, most), threads_for(c, need.threads))
    task_cpus = _floor(min(res.decode_cpus, cluster.cpus - sum(cpus), cluster.node_cpus))
    sizes = PipelineSizes(device_, max(task_cpus, STEP), res.decode_concurrency, stages)
    log.info("%s", sizes.describe(cluster))
    return sizes


def task_sizes(config: Config, cluster: Cluster) -> PipelineSizes:
    """A job of CPU tasks alone (the frame cache)."""
    _require_cpus(cluster)
    cpus = _floor(min(config.resources.decode_cpus, cluster.node_cpus))
    sizes = PipelineSizes("cpu", max(cpus, STEP), config.resources.decode_concurrency, {})
    log.info("%s", sizes.describe(cluster))
    return sizes


# --- fine-tunes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSizes:
    workers: int
    use_gpu: bool
    cpus_per_worker: float
    threads: int  # Paddle CPU math threads per worker
    task_cpus: float  # per data-loading task

    def worker_resources(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker} | ({"GPU": 1} if self.use_gpu else {})

    def describe(self, cluster: Cluster) -> str:
        where = "1 GPU + " if self.use_gpu else ""
        return (
            f"{self.workers} workers x ({where}{self.cpus_per_worker:g} CPU, {self.threads} threads), "
            f"data tasks {self.task_cpus:g} CPU each, on {cluster.describe()}"
        )


def training_sizes(config: Config, cluster: Cluster, phase_use_gpu: bool = True) -> TrainSizes:
    """Ray Train workers (``resources.train_workers``, else the seed's ``TRAIN.num_gpus``) and the
    size of the tasks that feed them."""
    res = config.resources
    workers = res.train_workers or config.train.num_gpus
    where = device(config, cluster, phase_use_gpu)
    _require_cpus(cluster)
    if where == "gpu" and workers > cluster.gpus:
        raise ConfigError(
            f"{workers} GPU training workers (resources.train_workers, else TRAIN.num_gpus), but the cluster has "
            f"{cluster.gpus:g} GPUs: set resources.train_workers to at most {int(cluster.gpus)} (TRAIN.batch_size "
            "is the global batch, split over them), or resources.use_gpu=false"
        )
    if res.train_cpus is not None:
        cpus = res.train_cpus
        if cpus * workers > cluster.cpus - _min_task_cpus(cluster) or cpus > cluster.node_cpus:
            raise ConfigError(
                f"resources.train_cpus={cpus:g} x {workers} workers does not fit on {cluster.describe()} "
                "with room left to load data: lower resources.train_cpus or resources.train_workers, or unset "
                "resources.train_cpus to size the workers to the cluster"
            )
    else:
        cpus = _floor(min(1.0, cluster.cpus * MODEL_SHARE / workers, cluster.node_cpus))
        if cpus < STEP:
            raise ConfigError(
                f"{workers} training workers cannot share {cluster.describe()}: "
                "lower resources.train_workers (or TRAIN.num_gpus)"
            )
    task_cpus = _floor(min(res.decode_cpus, cluster.cpus - cpus * workers, cluster.node_cpus))
    sizes = TrainSizes(workers, where == "gpu", cpus, threads_for(cpus, res.train_threads), max(task_cpus, STEP))
    log.info("training: %s", sizes.describe(cluster))
    return sizes


# --- the entry points: size on the cluster there is, or wait for an autoscaler -----------------


def size_pipeline(config: Config, needs: list[ModelNeed], phase_use_gpu: bool = True) -> PipelineSizes:
    """``pipeline_sizes`` on the cluster this job runs on (see ``sized``)."""
    gpu = str(config.resources.use_gpu).lower() == "true"
    bundles = [{"CPU": config.resources.decode_cpus}]
    bundles += [{"CPU": n.cpus, **({"GPU": n.gpus} if gpu and n.gpus else {})} for n in needs]
    return sized(config, lambda c: pipeline_sizes(config, c, needs, device(config, c, phase_use_gpu)), bundles)


def size_training(config: Config, phase_use_gpu: bool = True) -> TrainSizes:
    """``training_sizes`` on the cluster this job runs on (see ``sized``)."""
    workers = config.resources.train_workers or config.train.num_gpus
    gpu = str(config.resources.use_gpu).lower() == "true"
    bundles = [{"CPU": config.resources.train_cpus or 1.0, **({"GPU": 1} if gpu else {})}] * workers
    return sized(config, lambda c: training_sizes(config, c, phase_use_gpu), [*bundles, {"CPU": 1.0}])


# --- waiting for an autoscaling cluster --------------------------------------------------------


def sized(config: Config, size: Callable[[Cluster], object], bundles: list[dict[str, float]]):
    """``size(Cluster.find())``; when that fails and ``resources.wait_for_resources_s`` is set,
    asks the autoscaler for ``bundles`` and tries again as nodes join, until the time is up."""
    wait = config.resources.wait_for_resources_s
    deadline = time.monotonic() + wait
    asked = False
    while True:
        try:
            return size(Cluster.find())
        except ConfigError as exc:
            if time.monotonic() >= deadline:
                if wait:
                    raise ConfigError(f"{exc} (waited resources.wait_for_resources_s={wait:g} s)") from None
                raise
            if not asked:
                _request(bundles)
                asked = True
                log.warning("%s; asked the autoscaler for nodes, waiting up to %g s", exc, wait)
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.1)))


def _request(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as exc:  # no autoscaler on this cluster: waiting can still see nodes join
        log.info("could not ask the autoscaler for resources: %s", exc)


# --- helpers ----------------------------------------------------------------------------------


def threads_for(cpus: float, configured: int | None) -> int:
    """The math threads of an actor or worker holding ``cpus``: as configured, else one per whole CPU."""
    return configured or max(1, int(cpus + 1e-9))


def _floor(x: float) -> float:
    return math.floor(x / STEP + 1e-9) * STEP


def _min_task_cpus(cluster: Cluster) -> float:
    """CPUs always left for at least one data task."""
    return min(1.0, cluster.cpus * (1 - MODEL_SHARE))


def _require_cpus(cluster: Cluster) -> None:
    if cluster.cpus <= 0:
        raise ConfigError(
            f"the Ray cluster has no CPUs for decoding and data loading ({cluster.describe()}): add CPU nodes, "
            "or set resources.wait_for_resources_s to wait for an autoscaler to add them"
        )


def _fit(requests: list[float], budget: float, per_node: float) -> list[float]:
    """Shrinks ``requests`` proportionally until they add up to at most ``budget`` and each
    fits on one node; never below ``STEP``."""
    total = sum(requests)
    scale = min(1.0, budget / total) if total > 0 else 1.0
    return [max(_floor(min(r * scale, per_node)), STEP) if r > 0 else 0.0 for r in requests]


def _fit_gpus(needs: list[ModelNeed], gpus: list[float], cluster: Cluster) -> list[float]:
    for need, g in zip(needs, gpus, strict=True):
        if g > cluster.node_gpus:
            raise ConfigError(
                f"{need.gpus_key}={g:g}, but no node of the cluster has more than {cluster.node_gpus:g} GPUs: "
                f"lower {need.gpus_key}"
            )
    return _fit(gpus, cluster.gpus, cluster.node_gpus)
