"""TSN evaluation (TOP1/TOP5 on TEST) and prediction (top-k on INFER) on Ray Data.

    list -> load segments (CPU tasks, ``tsn_data.load_clips``) -> classifier (actor pool) -> driver

Videos that cannot be loaded are counted, logged and written as dead letters under
``save_dir``; they never stop the job.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.eval import classification as C
from vtplatform.tsn_data import (
    attach_cache,
    clip_frames,
    clip_spec,
    eval_plan,
    load_clips,
    read_list,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierSpec:
    depth: int
    num_classes: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    weights: str
    device: str  # cpu | gpu
    threads: int
    topk: int
    segments: int  # seg_num * seglen
    target_size: int


def read_weights(uri: str, storage: StorageSection) -> dict[str, np.ndarray]:
    """TSN classifier weights from a checkpoint, a run folder (its ``best/``) or a weight file
    (local or ``s3://``); refuses a checkpoint of another model."""
    from vtplatform.models.weights import read_weights as read_any

    loaded = read_any(uri, storage).require("TSN")
    log.info("weights: %s", st.redact(loaded.source))
    return loaded.state


class ClassifierStage:
    """Loads the classifier once per actor; turns loaded segments into top-k classes."""

    def __init__(self, spec: ClassifierSpec, storage: StorageSection):
        import paddle

        from vtplatform.models import tsn_classifier as tc

        self.spec = spec
        model = tc.build(tc.TSNClassifierConfig(spec.depth, spec.num_classes, spec.image_mean, spec.image_std))
        tc.load_weights(model, read_weights(spec.weights, storage))
        model.eval()
        probs_model = tc.TSNProbabilities(model)
        if spec.device == "cpu":
            import tempfile

            from vtplatform.inference import Predictor, export_model

            shape = [None, spec.segments, spec.target_size, spec.target_size, 3]
            with tempfile.TemporaryDirectory(prefix="vtp-export-") as tmp:
                self.engine = Predictor(
                    export_model(probs_model, [paddle.static.InputSpec(shape, "uint8", "frames")], tmp),
                    threads=spec.threads,
                )
        else:
            paddle.set_device("gpu")
            probs_model.to(device="gpu")

            def run(frames: np.ndarray) -> np.ndarray:
                with paddle.no_grad():
                    return probs_model(paddle.to_tensor(frames)).numpy()

            self.engine = run

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = [i for i, e in enumerate(batch.column(S.ERROR_TYPE).to_pylist()) if e is None]
        n, k = batch.num_rows, max(self.spec.topk, 5)  # top-5 for TOP5_ACC; topk for predictions
        ids: list = [None] * n
        top: list = [None] * n
        label_prob: list = [None] * n
        if ok:
            probs = self.engine(clip_frames(batch.take(ok), self.spec.segments, self.spec.target_size))
            top_ids, top_probs = C.topk(probs, k)
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
class Results:
    table: pa.Table  # S.EVAL_RESULT_SCHEMA rows, in list order, loaded videos only
    failed: list[dict] = field(default_factory=list)  # dead-letter rows
    rejected: int = 0
    elapsed_seconds: float = 0.0


def classify(config: Config, mode: str, weights: str, filelist: str | None, labelled: bool) -> Results:
    """Runs the pipeline over ``filelist`` (default: the phase's ``filelist``). Needs ``ray.init()``."""

    from vtplatform import resources as R
    from vtplatform.frame_cache import open_cache
    from vtplatform.pipeline import blocks_dataset, input_blocks, map_cpu_tasks
    from vtplatform.stages import videos_per_call

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
    sizes = R.size_pipeline(config, [R.tsn_need(config)], phase.use_gpu)
    model = sizes.models["TSN"]
    res = config.resources
    cspec = ClassifierSpec(
        depth=config.model.num_layers,
        num_classes=config.model.num_classes,
        image_mean=config.model.image_mean,
        image_std=config.model.image_std,
        weights=weights,
        device=sizes.device,
        threads=model.threads,
        topk=config.model.topk,
        segments=spec.seg_num * spec.seglen,
        target_size=spec.target_size,
    )
    plan = eval_plan(entries)
    ds = blocks_dataset(input_blocks(plan, res.decode_batch_size))
    ds = map_cpu_tasks(
        ds,
        load_clips,
        batch_size=None,
        num_cpus=sizes.task_cpus,
        concurrency=sizes.task_concurrency,
        max_retries=res.decode_max_retries,
        fn_kwargs={"spec": spec},
    )
    ds = ds.map_batches(
        ClassifierStage,
        batch_size=res.tsn_batch_size or videos_per_call(spec.seg_num * spec.seglen),
        batch_format="pyarrow",
        compute=model.compute(),
        fn_constructor_kwargs={"spec": cspec, "storage": config.storage},
        **model.ray_args(),
    )
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(parts) if parts else S.EVAL_RESULT_SCHEMA.empty_table()
    order = {v: i for i, v in enumerate(plan.column(S.VIDEO_ID).to_pylist())}
    ranks = [order[v] for v in table.column(S.VIDEO_ID).to_pylist()]
    table = table.take(pa.array(np.argsort(ranks, kind="stable"), pa.int64()))
    ok = pa.array([e is None for e in table.column(S.ERROR_TYPE).to_pylist()], pa.bool_())
    failed = (
        table.filter(pa.compute.invert(ok)).select([S.VIDEO_ID, S.URI, S.STAGE, S.ERROR_TYPE, S.MESSAGE]).to_pylist()
    )
    for r in failed:
        log.warning("could not load %s: %s/%s %s", st.redact(r[S.URI]), r[S.STAGE], r[S.ERROR_TYPE], r[S.MESSAGE])
    return Results(table.filter(ok), list(videos.rejected) + failed, len(videos.rejected), time.perf_counter() - start)


def _failure_counts(failed: list[dict]) -> dict[str, int]:
    return dict(collections.Counter(f"{r[S.STAGE]}/{r[S.ERROR_TYPE]}" for r in failed))


def _write_dead_letters(failed: list[dict], save_dir: str | None, storage: StorageSection) -> None:
    if not failed or not save_dir:
        return
    from vtplatform.pipeline import dead_letter_table

    fs, root = st.filesystem(save_dir, storage)
    st.write_parquet(dead_letter_table(failed), fs, f"{root}/{S.DEAD_LETTERS_DIR}/part-{time.time_ns()}.parquet")


def _label_names(label_file: str | None, config: Config) -> list[str] | None:
    from vtplatform.labels import check_label_names, read_label_names

    if not label_file:
        return None
    names = read_label_names(label_file, config.storage)
    check_label_names(names, config.model.num_classes, label_file)
    return names


def run_eval(
    config: Config,
    weights: str,
    save_dir: str | None = None,
    filelist: str | None = None,
    label_file: str | None = None,
) -> dict[str, Any]:
    """TOP1/TOP5, per-class accuracy and confusions on the TEST list (``TEST.seg_num`` centred
    segments); writes ``report.json`` under ``save_dir`` when given. Returns the report."""
    results = classify(config, "test", weights, filelist, labelled=True)
    if not results.table.num_rows:
        raise ConfigError(f"no video of the test list could be loaded ({_failure_counts(results.failed)})")
    report = C.evaluate(
        np.array(results.table.column(S.CLASS_IDS).to_pylist(), np.int64),
        np.array(results.table.column(S.LABEL).to_pylist(), np.int64),
        config.model.num_classes,
        label_probs=np.array(results.table.column(S.LABEL_PROB).to_pylist(), np.float64),
        class_names=_label_names(label_file, config),
    )
    report |= {
        "model": "TSN",
        "weights": st.redact(weights),
        "segments": config.test.seg_num,
        "failed": _failure_counts(results.failed),
        "elapsed_seconds": results.elapsed_seconds,
    }
    log.info("%s", C.format_report(report))
    if save_dir:
        C.write_json(report, save_dir.rstrip("/") + "/" + S.REPORT_FILE, config.storage)
        _write_dead_letters(results.failed, save_dir, config.storage)
    return report


def run_predict(
    config: Config,
    weights: str,
    save_dir: str,
    label_file: str | None = None,
    filelist: str | None = None,
    top_k: int | None = None,
    seed_json: bool = False,
):
    """Top-k (``MODEL.topk``) classes of every INFER video (``INFER.seg_num`` centred segments):
    ``save_dir/predictions/part-00000.parquet`` and, with ``seed_json``, ``json/result<i>.json``."""
    import json

    from vtplatform.labels import label_fingerprint
    from vtplatform.predict import PredictSummary, seed_json_bytes

    k = min(top_k or config.model.topk, config.model.num_classes)
    results = classify(config, "infer", weights, filelist, labelled=False)
    names = _label_names(label_file, config)
    top_ids = np.array([ids[:k] for ids in results.table.column(S.CLASS_IDS).to_pylist()], np.int64).reshape(-1, k)
    top_probs = np.array([p[:k] for p in results.table.column(S.PROBS).to_pylist()], np.float32).reshape(-1, k)
    table = C.predictions_table(
        results.table.column(S.VIDEO_ID).to_pylist(), results.table.column(S.URI).to_pylist(), top_ids, top_probs, names
    )
    metadata = {
        "model": "TSN",
        "weights": st.redact(weights),
        "label_fingerprint": label_fingerprint(names, config.model.num_classes),
        "top_k": k,
    }
    table = table.replace_schema_metadata({S.METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    fs, root = st.filesystem(save_dir, config.storage)
    st.write_parquet(table, fs, f"{root}/{S.PREDICTIONS_DIR}/part-00000.parquet")
    if seed_json:
        for i, row in enumerate(table.to_pylist()):
            st.write_bytes(seed_json_bytes(row), fs, f"{root}/{S.JSON_DIR}/result{i}.json")
    _write_dead_letters(results.failed, save_dir, config.storage)
    log.info("top-%d predictions:\n%s", k, C.format_predictions(table))
    return PredictSummary(
        st.redact(save_dir),
        table.num_rows,
        _failure_counts(results.failed),
        results.elapsed_seconds,
        st.redact(weights),
    )
