"""The extraction job: manifest -> decode (CPU tasks) -> TSN (actor pool) -> Parquet, on Ray Data.

Output layout under ``save_dir`` (a local folder or an ``s3://`` prefix)::

    features/part-<hash>.parquet      one row per video (schema.feature_schema)
    dead_letters/part-<hash>.parquet  one row per video that failed (schema.DEAD_LETTER_SCHEMA)
    npy/<video_id>.npy                with output.format=npy: the seed's [seg, C] float32 files
    runs/<timestamp>.json             the summary of each run

Resumable by construction: part files are written atomically and named from the videos they
hold, and a rerun skips every video already in ``features`` (and in ``dead_letters`` unless
``retry_failed``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

import vtplatform
from vtplatform import faults as F
from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError
from vtplatform.pipeline import JobSummary, VideoJob, map_cpu_tasks, prepare_output, run_video_job
from vtplatform.stages import (
    CRASHES_BEFORE_DEAD_LETTER,
    TSNSpec,
    TSNStage,
    decode_ledger,
    decode_options,
    decode_videos,
    videos_per_call,
)

log = logging.getLogger(__name__)


def provenance(config: Config, fingerprint: str, feature_dim: int, precision: str) -> dict[str, Any]:
    """What the schema metadata records about how the features were made."""
    infer = config.infer
    return {
        "schema_version": S.SCHEMA_VERSION,
        "vtplatform_version": vtplatform.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": "TSN", "depth": config.model.num_layers, "feature_dim": feature_dim},
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


class FeatureOutput:
    """Good rows -> one ``features`` part (the ``feature_schema`` table), plus the seed's
    ``npy/<video_id>.npy`` files when asked."""

    directory = S.FEATURES_DIR

    def __init__(self, schema: pa.Schema, write_npy: bool):
        self.schema = schema
        self.write_npy = write_npy

    def write(self, good: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        features = self.table(good)
        st.write_parquet(features, fs, f"{root}/{self.directory}/{part}")
        if self.write_npy:
            arrays = features.column(S.FEATURES).combine_chunks().to_numpy_ndarray()
            for video_id, array in zip(features.column(S.VIDEO_ID).to_pylist(), arrays, strict=True):
                buf = io.BytesIO()
                np.save(buf, array.astype(np.float32))
                st.write_bytes(buf.getvalue(), fs, f"{root}/{S.NPY_DIR}/{st.safe_filename(video_id)}.npy")

    def table(self, good: pa.Table) -> pa.Table:
        tensor_type = self.schema.field(S.FEATURES).type
        seg, dim = tensor_type.shape
        dtype = tensor_type.value_type.to_pandas_dtype()
        feats = np.stack([np.frombuffer(b, dtype=dtype).reshape(seg, dim) for b in good.column(S.FEATURES).to_pylist()])
        indices = pc.list_flatten(good.column(S.FRAME_INDICES).combine_chunks()).cast(pa.int32())
        columns = {
            S.VIDEO_ID: good.column(S.VIDEO_ID),
            S.URI: good.column(S.URI),
            S.FEATURES: S.features_array(feats, str(np.dtype(dtype))),
            S.NUM_FRAMES: good.column(S.NUM_FRAMES),
            S.FRAME_INDICES: pa.FixedSizeListArray.from_arrays(indices, seg),
            S.FPS: good.column(S.FPS),
            S.WIDTH: good.column(S.WIDTH),
            S.HEIGHT: good.column(S.HEIGHT),
            S.DECODER: good.column(S.DECODER),
        }
        return pa.table(columns, schema=self.schema)


def check_same_extractor(existing: pa.Schema | None, prov: dict[str, Any], where: str) -> None:
    """Refuses to add features to a table made with another model, weights or settings."""
    old = S.read_provenance(existing) if existing is not None else None
    diff = S.signature_diff(old, prov) if old is not None else []
    if diff:
        raise ConfigError(
            f"{st.redact(where)} holds features made differently ({'; '.join(diff)}); "
            "use another --save_dir or the same model, weights and settings"
        )


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
        depth=config.model.num_layers,
        image_mean=config.model.image_mean,
        image_std=config.model.image_std,
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
    from vtplatform.models.tsn import TSNConfig, load_backbone
    from vtplatform.models.weights import WeightsError

    tsn_config = TSNConfig.from_model_section(config.model)
    try:
        with st.local_copy(weights, config.storage) if weights else contextlib.nullcontext() as local:
            _, fingerprint = load_backbone(tsn_config, local, config.extract.seed)
    except (WeightsError, OSError) as exc:
        raise ConfigError(f"cannot load TSN weights {st.redact(str(weights))}: {st.redact(str(exc))}") from exc
    return fingerprint, tsn_config.feature_dim


def tsn_pipeline(ds, config: Config, spec: TSNSpec, plan: R.PipelinePlan):
    """``(video_id, uri)`` rows -> decode tasks -> TSN actors: rows with ``features`` bytes."""
    res = config.resources
    ds = map_cpu_tasks(
        ds,
        decode_videos,
        batch_size=None,  # a block per task, as first_stage_input made them
        num_cpus=plan.task_cpus,
        concurrency=plan.task_concurrency,
        max_retries=res.decode_max_retries + CRASHES_BEFORE_DEAD_LETTER * res.decode_batch_size,
        fn_kwargs={
            "options": decode_options(config),
            "storage": config.storage,
            "ledger": decode_ledger(),
            "timeout_s": config.extract.decode_timeout_s,
            "faults": F.decode_faults(),
        },
    )
    tsn = plan.models["TSN"]
    return ds.map_batches(
        TSNStage,
        batch_size=res.tsn_batch_size or videos_per_call(config.infer.seg_num),
        batch_format="pyarrow",
        compute=tsn.compute(),  # grows as the cluster makes room
        fn_constructor_kwargs={"spec": spec, "storage": config.storage},
        **tsn.ray_args(),
    )


def run_extract(
    config: Config, manifest: str, save_dir: str, weights: str | None = None, retry_failed: bool = False
) -> JobSummary:
    """Extracts features for every manifest video not yet in ``save_dir``. Needs ``ray.init()``."""
    start = time.perf_counter()
    config = prepare_output(config, save_dir)
    plan = R.size_pipeline(config, [R.tsn_need(config)])
    spec = tsn_spec(config, weights, plan.device, plan.models["TSN"].threads)
    fingerprint, feature_dim = weights_fingerprint(config, weights)
    prov = provenance(config, fingerprint, feature_dim, spec.precision)
    schema = S.feature_schema(config.infer.seg_num, feature_dim, config.output.dtype, prov)
    job = VideoJob(
        "extraction",
        S.FEATURES_DIR,
        spec.device,
        stages=lambda ds: tsn_pipeline(ds, config, spec, plan),
        outputs=[FeatureOutput(schema, config.output.format == "npy")],
        writer_cpus=plan.writer_cpus,
        frames_per_video=config.infer.seg_num,
        check_output=lambda fs, root, state: check_same_extractor(state.schema, prov, save_dir),
    )
    return run_video_job(config, manifest, save_dir, job, retry_failed, start)
