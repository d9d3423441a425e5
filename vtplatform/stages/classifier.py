"""The TSN classifier stage: loaded clips -> top classes, on an actor pool that declares its
resources like the TSN feature stage (``resources.tsn_*``); and ``classify``, the pipeline that
evaluation and prediction share::

    list -> load segments (CPU tasks, ``tsn_data.load_clips``) -> classifier (actor pool)
         -> the driver (evaluation, ``collect``) or the prediction table (``predict``)

Videos that cannot be loaded come back as failure rows; they never stop the job.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vtplatform import resources as R
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.frame_cache import open_cache
from vtplatform.inference import engine
from vtplatform.labels import top_k_indices
from vtplatform.models import tsn_classifier as tc
from vtplatform.models.weights import read_weights as read_any
from vtplatform.outputs.dead_letters import write_dead_letters
from vtplatform.pipeline import blocks_dataset, input_blocks
from vtplatform.stages.decode import videos_per_call
from vtplatform.stages.tsn import need as tsn_need
from vtplatform.tsn_data import attach_cache, clip_frames, clip_spec, eval_samples, load_stage, read_list

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierSpec:
    model: tc.TSNClassifierConfig
    weights: str
    device: str  # cpu | gpu
    threads: int
    topk: int
    segments: int  # seg_num * seglen
    target_size: int


def read_weights(uri: str, storage: StorageSection) -> dict[str, np.ndarray]:
    """TSN classifier weights from a checkpoint, a run folder (its ``best/``) or a weight file
    (local or ``s3://``); refuses a checkpoint of another model."""
    loaded = read_any(uri, storage).require(S.MODEL_TSN)
    log.info("weights: %s", st.redact(loaded.source))
    return loaded.state


class ClassifierStage:
    """Loads the classifier once per actor; turns loaded segments into top-k classes."""

    def __init__(self, spec: ClassifierSpec, storage: StorageSection):
        self.spec = spec
        model = tc.build(spec.model)
        tc.load_weights(model, read_weights(spec.weights, storage))
        shape = [None, spec.segments, spec.target_size, spec.target_size, 3]
        self.engine = engine(
            tc.TSNProbabilities(model), shape, spec.device, "float32", spec.threads, name="TSN classifier"
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = [i for i, e in enumerate(batch.column(S.ERROR_TYPE).to_pylist()) if e is None]
        n, k = batch.num_rows, max(self.spec.topk, 5)  # top-5 for TOP5_ACC; topk for predictions
        ids: list = [None] * n
        top: list = [None] * n
        label_prob: list = [None] * n
        if ok:
            probs = self.engine(clip_frames(batch.take(ok), self.spec.segments, self.spec.target_size))
            top_ids = top_k_indices(probs, k)
            top_probs = np.take_along_axis(probs, top_ids, axis=1)
            labels = batch.column(S.LABEL).to_pylist()
            for j, i in enumerate(ok):
                ids[i], top[i] = top_ids[j].tolist(), top_probs[j].tolist()
                label_prob[i] = float(probs[j, labels[i]]) if 0 <= labels[i] < probs.shape[1] else None
        columns = {
            S.VIDEO_ID: batch.column(S.VIDEO_ID),
            S.URI: batch.column(S.URI),
            S.LABEL: batch.column(S.LABEL),
            S.CLASS_IDS: pa.array(ids, pa.list_(pa.int32())),
            S.PROBS: pa.array(top, pa.list_(pa.float32())),
            S.LABEL_PROB: pa.array(label_prob, pa.float32()),
            S.STAGE: batch.column(S.STAGE),
            S.ERROR_TYPE: batch.column(S.ERROR_TYPE),
            S.MESSAGE: batch.column(S.MESSAGE),
        }
        return pa.table(columns, schema=S.EVAL_RESULT_SCHEMA)


@dataclass
class Classified:
    """The classifier pipeline over a list: its dataset (``schema.EVAL_RESULT_SCHEMA`` rows,
    failures included), the entries in list order, and the list's rejected lines."""

    dataset: Any
    entries: pa.Table  # the list's videos, in list order
    rejected: list[dict]
    started: float


@dataclass
class Results:
    table: pa.Table  # S.EVAL_RESULT_SCHEMA rows, in list order, loaded videos only
    failed: list[dict] = field(default_factory=list)  # dead-letter rows
    rejected: int = 0
    elapsed_seconds: float = 0.0

    def failure_counts(self) -> dict[str, int]:
        """``stage/error_type`` -> videos."""
        return dict(collections.Counter(f"{r[S.STAGE]}/{r[S.ERROR_TYPE]}" for r in self.failed))

    def write_dead_letters(self, save_dir: str | None, storage: StorageSection) -> None:
        if not self.failed or not save_dir:
            return
        fs, root = st.filesystem(save_dir, storage)
        write_dead_letters(self.failed, fs, root)


def classify(config: Config, mode: str, weights: str, filelist: str | None, labelled: bool) -> Classified:
    """The pipeline over ``filelist`` (default: the phase's ``filelist``), not yet run. Needs ``ray.init()``."""
    start = time.perf_counter()
    phase = getattr(config, mode)
    source = filelist or phase.filelist
    if not source:
        raise ConfigError(
            f"no list to {'evaluate' if labelled else 'tag'}: pass --filelist or set {mode.upper()}.filelist"
        )
    read_weights(weights, config.storage)  # a bad file fails here, before any video is touched
    videos = read_list(source, config, labelled=labelled)
    entries, cache = videos.entries, None
    if config.frame_cache.path:
        cache, index = open_cache(config.frame_cache.path, config.storage)
        entries, hits = attach_cache(entries, index)
        log.info("frame cache %s holds %d of %d videos", st.redact(config.frame_cache.path), hits, len(videos))
    spec = clip_spec(config, mode, seed=0, cache=cache)
    sizes = R.size_pipeline(config, [tsn_need(config)], phase.use_gpu)
    model = sizes.models[S.MODEL_TSN]
    res = config.resources
    cspec = ClassifierSpec(
        model=tc.TSNClassifierConfig.from_model_section(config.model),
        weights=weights,
        device=sizes.device,
        threads=model.threads,
        topk=config.model.topk,
        segments=spec.seg_num * spec.seglen,
        target_size=spec.target_size,
    )
    samples = eval_samples(entries)
    ds = blocks_dataset(input_blocks(samples, res.decode_batch_size))
    ds = load_stage(ds, spec, sizes.task_cpus, sizes.task_concurrency, res.decode_max_retries)
    ds = ds.map_batches(
        ClassifierStage,
        batch_size=videos_per_call(spec.seg_num * spec.seglen),  # about FRAMES_PER_BLOCK frames
        batch_format="pyarrow",
        compute=model.compute(),
        fn_constructor_kwargs={"spec": cspec, "storage": config.storage},
        **model.ray_args(),
    )
    return Classified(ds, samples, list(videos.rejected), start)


def collect(classified: Classified) -> Results:
    """Runs the pipeline and gathers its rows in the driver, in list order (evaluation needs them all)."""
    parts = list(classified.dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(parts) if parts else S.EVAL_RESULT_SCHEMA.empty_table()
    order = {v: i for i, v in enumerate(classified.entries.column(S.VIDEO_ID).to_pylist())}
    ranks = [order[v] for v in table.column(S.VIDEO_ID).to_pylist()]
    table = table.take(pa.array(np.argsort(ranks, kind="stable"), pa.int64()))
    ok = pa.array([e is None for e in table.column(S.ERROR_TYPE).to_pylist()], pa.bool_())
    failed = table.filter(pc.invert(ok)).select([S.VIDEO_ID, S.URI, S.STAGE, S.ERROR_TYPE, S.MESSAGE]).to_pylist()
    for r in failed:
        log.warning("could not load %s: %s/%s %s", st.redact(r[S.URI]), r[S.STAGE], r[S.ERROR_TYPE], r[S.MESSAGE])
    elapsed = time.perf_counter() - classified.started
    return Results(table.filter(ok), classified.rejected + failed, len(classified.rejected), elapsed)
