"""The extraction job: manifest -> decode (CPU tasks) -> TSN (actor pool) -> Parquet, on Ray Data.

Output layout under ``save_dir`` (a local folder or an ``s3://`` prefix)::

    features/part-<hash>.parquet      one row per video (schema.feature_schema)
    dead_letters/part-<hash>.parquet  one row per video that failed (schema.DEAD_LETTER_SCHEMA)
    npy/<video_id>.npy                with output.format=npy: the seed's [seg, C] float32 files
    runs/<timestamp>.json             the summary of each run

The job supplies its stages (``stages.decode``, ``stages.tsn``) and its output
(``outputs.features``); ``pipeline.run_video_job`` does the rest. Resumable by construction: part
files are written atomically and named from the videos they hold, and a rerun skips every video
already in ``features`` (and in ``dead_letters`` unless ``retry_failed``).
"""

from __future__ import annotations

import logging
import time

from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform.config import Config
from vtplatform.outputs.features import FeatureOutput
from vtplatform.pipeline import JobSummary, VideoJob, prepare_output, read_entries, run_video_job
from vtplatform.stages import tsn
from vtplatform.stages.decode import decode_stage

log = logging.getLogger(__name__)


def run_extract(
    config: Config, manifest: str, save_dir: str, weights: str | None = None, retry_failed: bool = False
) -> JobSummary:
    """Extracts features for every manifest video not yet in ``save_dir``. Needs ``ray.init()``."""
    start = time.perf_counter()
    config = prepare_output(config, save_dir)
    sizes = R.size_pipeline(config, [tsn.need(config)])
    spec = tsn.tsn_spec(config, weights, sizes.device, sizes.models[tsn.MODEL_NAME].threads)
    fingerprint, feature_dim = tsn.weights_fingerprint(config, weights)
    prov = tsn.provenance(config, fingerprint, feature_dim, spec.precision)
    schema = S.feature_schema(config.infer.seg_num, feature_dim, config.output.dtype, prov)
    job = VideoJob(
        "extraction",
        spec.device,
        entries=read_entries(manifest, config),
        stages=[
            lambda ds: decode_stage(ds, config, sizes),
            lambda ds: tsn.tsn_stage(ds, config, spec, sizes),
        ],
        outputs=[FeatureOutput(schema, config.output.format == "npy", save_dir)],
        writer_cpus=sizes.writer_cpus,
        frames_per_video=config.infer.seg_num,
    )
    return run_video_job(config, save_dir, job, retry_failed, start)
