"""The TSN stage: sampled crops -> (seg, C) features per video (and per timeline chunk), on an
actor pool that declares its own resources (``resources.tsn_*``); and what TSN features are: the
weights' fingerprint and the provenance a feature table records (``outputs.features``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

import vtplatform
from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.inference import frame_engine
from vtplatform.memory import ActorMemory
from vtplatform.models.tsn import TSNConfig, load_backbone
from vtplatform.models.weights import WeightsError

MODEL_NAME = S.MODEL_TSN


def need(config: Config) -> R.ModelNeed:
    """The TSN actors' resources, from ``resources.tsn_*``."""
    res = config.resources
    return R.ModelNeed(
        MODEL_NAME,
        res.tsn_cpus,
        res.tsn_gpus,
        res.tsn_actors,
        res.tsn_threads,
        "resources.tsn_cpus",
        "resources.tsn_gpus",
    )


@dataclass(frozen=True)
class TSNSpec:
    """Everything a TSN actor needs to build its model, decided once by the driver."""

    model: TSNConfig
    weights: str | None
    seed: int
    device: str  # "cpu" or "gpu"
    precision: str  # "float32" or "float16"
    threads: int
    frames_per_forward: int
    num_segments: int
    target_size: int
    out_dtype: str  # dtype of the features handed on


class TSNStage:
    """Loads the TSN backbone once per actor; turns each row's crops into their features: (seg, C)
    for a video, (frames, C) for a timeline chunk. Each row goes through the model on its own
    (``frames_per_forward`` crops a call): oneDNN's results change in the last bits with the batch
    shape, and a video's features must not depend on which rows share its batch (tagging with and
    without segments gives the same tags).

    Ray Data hands the actor one decoded block at a time (``tsn_stage``), and the stage reads each
    row's crops where the block holds them, without a copy. So its
    memory is bounded by frames (a block holds at most ``FRAMES_PER_BLOCK`` crops, or one row) and
    ``frames_per_forward``, whatever the rows hold; each row records the actor's memory figures
    (``memory.ActorMemory``: ``TSN_PEAK_MB``, ``TSN_CALL_MB``) for the job summary."""

    def __init__(self, spec: TSNSpec, storage: StorageSection):
        self.spec = spec
        with st.local_copy(spec.weights, storage) if spec.weights else contextlib.nullcontext() as weights:
            backbone, self.fingerprint = load_backbone(spec.model, weights, spec.seed)
        self.engine = frame_engine(backbone, spec.device, spec.precision, spec.threads)
        self.memory = ActorMemory()

    def features(self, frames: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 3) uint8 -> (N, C) float32, ``frames_per_forward`` frames at a time."""
        step = self.spec.frames_per_forward
        return np.concatenate([self.engine(frames[i : i + step]) for i in range(0, len(frames), step)])

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        self.memory.begin()
        size = self.spec.target_size
        frames = S.binary_views(batch.column(S.FRAMES))  # read in place: the crops are never copied
        ok = [i for i, f in enumerate(frames) if f is not None]
        out: list[bytes | None] = [None] * len(frames)
        for i in ok:  # a row at a time, so that its features never depend on the rows beside it
            crops = frames[i].reshape(-1, size, size, 3)  # a video's or a chunk's
            out[i] = self.features(crops).astype(self.spec.out_dtype).tobytes()
            self.memory.sample()  # with the row's crops and features in hand
        elapsed = (time.perf_counter() - start) / max(len(ok), 1)
        table = batch.drop_columns([S.FRAMES]).append_column(
            pa.field(S.FEATURES, pa.large_binary()), pa.array(out, pa.large_binary())
        )
        seconds = [elapsed if f is not None else 0.0 for f in frames]
        table = table.append_column(pa.field(S.INFER_SECONDS, pa.float32()), pa.array(seconds, pa.float32()))
        self.memory.end()
        for name, mb in ((S.TSN_PEAK_MB, self.memory.grown), (S.TSN_CALL_MB, self.memory.call)):
            table = table.append_column(pa.field(name, pa.float32()), pa.array([mb] * len(frames), pa.float32()))
        return table


def tsn_spec(config: Config, weights: str | None, device: str, threads: int) -> TSNSpec:
    precision = config.extract.precision
    if precision == "auto":
        precision = "float16" if device == "gpu" else "float32"
    if precision == "float16" and device == "cpu":
        raise ConfigError(
            "extract.precision=float16 needs GPUs; none are used (resources.use_gpu, or no GPU in the cluster)"
        )
    res = config.resources
    return TSNSpec(
        model=TSNConfig.from_model_section(config.model),
        weights=weights,
        seed=config.extract.seed,
        device=device,
        precision=precision,
        threads=threads,
        frames_per_forward=res.tsn_frames_per_forward,
        num_segments=config.infer.seg_num,
        target_size=config.infer.target_size,
        out_dtype=config.output.dtype,
    )


def weights_fingerprint(config: Config, weights: str | None) -> tuple[str, int]:
    """Loads the weights once in the driver: a bad file fails here, before any video is touched."""
    tsn_config = TSNConfig.from_model_section(config.model)
    try:
        with st.local_copy(weights, config.storage) if weights else contextlib.nullcontext() as local:
            _, fingerprint = load_backbone(tsn_config, local, config.extract.seed)
    except (WeightsError, OSError) as exc:
        raise ConfigError(f"cannot load TSN weights {st.redact(str(weights))}: {st.redact(str(exc))}") from exc
    return fingerprint, tsn_config.feature_dim


def tsn_stage(ds, config: Config, spec: TSNSpec, sizes: R.PipelineSizes):
    """Adds the TSN actors to a dataset of decoded rows: rows with ``features`` bytes. On CPU a block
    a call, as the decode task made it (``batch_size=None``: never several gathered to make up a
    number of rows), so that a call holds at most one block's crops; the stage then takes its rows
    one at a time. One call a row would cost Ray Data's per-batch overhead for every row, failed
    ones included (a 2,048-entry task of missing files is 2,048 failure rows). On GPUs, where Ray
    Data needs a number, a row a call (1 gathers no blocks either)."""
    tsn = sizes.models[MODEL_NAME]
    return ds.map_batches(
        TSNStage,
        batch_size=1 if tsn.num_gpus else None,  # Ray Data wants a number with GPUs: 1 gathers no blocks
        batch_format="pyarrow",
        compute=tsn.compute(),  # grows as the cluster makes room
        fn_constructor_kwargs={"spec": spec, "storage": config.storage},
        **tsn.ray_args(),
    )


def provenance(config: Config, fingerprint: str, feature_dim: int, precision: str) -> dict[str, Any]:
    """What the schema metadata records about how the features were made."""
    infer = config.infer
    return {
        "schema_version": S.SCHEMA_VERSION,
        "vtplatform_version": vtplatform.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": MODEL_NAME, "depth": config.model.num_layers, "feature_dim": feature_dim},
        "weights": fingerprint,
        "sampling": {"rule": "videotag-infer", "num_segments": infer.seg_num, "seglen": config.model.seglen},
        "preprocessing": {
            "short_size": infer.short_size,
            "target_size": infer.target_size,
            "resize": "pillow-bilinear, exactly 4:3 of the short side unless it already equals short_size",
            "crop": "centre, round-half-even offsets",
            "image_mean": list(config.model.image_mean),
            "image_std": list(config.model.image_std),
        },
        "feature_dtype": config.output.dtype,
        "inference_precision": precision,
    }
