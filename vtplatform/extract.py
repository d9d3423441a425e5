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

import collections
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

import vtplatform
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.manifest import read_manifest
from vtplatform.stages import (
    DECODE_SECONDS,
    INFER_SECONDS,
    TSNSpec,
    TSNStage,
    decode_options,
    decode_resources,
    decode_videos,
    tsn_resources,
)

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
DEAD_LETTERS_DIR = "dead_letters"
NPY_DIR = "npy"
RUNS_DIR = "runs"


@dataclass
class ExtractSummary:
    save_dir: str
    manifest_entries: int = 0
    duplicates: int = 0
    skipped: int = 0  # already done by an earlier run
    submitted: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # "stage/error_type" -> count
    frames: int = 0
    decode_seconds: float = 0.0  # summed over videos (CPU-seconds of decode tasks)
    infer_seconds: float = 0.0  # summed over videos (actor time)
    elapsed_seconds: float = 0.0
    device: str = "cpu"

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def format(self) -> str:
        rate = self.succeeded / self.elapsed_seconds if self.elapsed_seconds else 0.0
        lines = [
            "extraction summary",
            f"  manifest entries      {self.manifest_entries} ({self.duplicates} duplicates collapsed)",
            f"  skipped (done before) {self.skipped}",
            f"  processed now         {self.succeeded} ok, {self.failed_total} failed",
        ]
        for reason, count in sorted(self.failed.items()):
            lines.append(f"    failed {reason:<26} {count}")
        lines += [
            f"  sampled frames        {self.frames}",
            f"  decode                {self.decode_seconds:.1f} task-s ({self.decode_seconds / max(self.submitted, 1):.2f} s/video)",
            f"  TSN on {self.device:<14} {self.infer_seconds:.1f} actor-s ({self.infer_seconds / max(self.succeeded, 1):.2f} s/video)",
            f"  wall time             {self.elapsed_seconds:.1f} s, {rate:.2f} videos/s, {self.frames / max(self.elapsed_seconds, 1e-9):.1f} frames/s",
            f"  features              {self.save_dir.rstrip('/')}/{FEATURES_DIR}",
            f"  dead letters          {self.save_dir.rstrip('/')}/{DEAD_LETTERS_DIR}",
        ]
        return "\n".join(lines)


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


def _part_name(video_ids: list[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(video_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def dead_letter_table(rows: list[dict]) -> pa.Table:
    now = dt.datetime.now(dt.timezone.utc)
    return pa.Table.from_pylist([{**r, S.FAILED_AT: now} for r in rows], schema=S.DEAD_LETTER_SCHEMA)


class FeatureSink(Datasink):
    """The writer stage: each write task gets at least ``rows_per_file`` rows, writes the good
    ones to one features part and the failed ones to one dead-letter part, and returns counts."""

    def __init__(self, save_dir: str, storage: StorageSection, schema: pa.Schema, write_npy: bool, rows_per_file: int):
        self.save_dir = save_dir.rstrip("/")
        self.storage = storage
        self.schema = schema
        self.write_npy = write_npy
        self.rows_per_file = rows_per_file
        self.stats: dict[str, Any] = {}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "FeatureWriter"

    def write(self, blocks, ctx) -> dict[str, Any]:
        tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"ok": 0, "frames": 0, "failed": {}, DECODE_SECONDS: 0.0, INFER_SECONDS: 0.0}
        table = pa.concat_tables(tables)
        fs, root = st.filesystem(self.save_dir, self.storage)
        failed_mask = pc.is_valid(table.column(S.ERROR_TYPE))
        good = table.filter(pc.invert(failed_mask))
        bad = table.filter(failed_mask)
        if good.num_rows:
            features = self.feature_table(good)
            st.write_parquet(features, fs, f"{root}/{FEATURES_DIR}/{_part_name(good.column(S.VIDEO_ID).to_pylist())}")
            if self.write_npy:
                self._write_npy(features, fs, root)
        if bad.num_rows:
            rows = bad.select([S.VIDEO_ID, S.URI, S.STAGE, S.ERROR_TYPE, S.MESSAGE]).to_pylist()
            st.write_parquet(dead_letter_table(rows), fs, f"{root}/{DEAD_LETTERS_DIR}/{_part_name(bad.column(S.VIDEO_ID).to_pylist())}")
        reasons = collections.Counter(f"{s}/{e}" for s, e in zip(bad.column(S.STAGE).to_pylist(), bad.column(S.ERROR_TYPE).to_pylist(), strict=True))
        return {
            "ok": good.num_rows,
            "frames": good.num_rows * self.schema.field(S.FEATURES).type.shape[0],
            "failed": dict(reasons),
            DECODE_SECONDS: float(pc.sum(table.column(DECODE_SECONDS)).as_py() or 0.0),
            INFER_SECONDS: float(pc.sum(table.column(INFER_SECONDS)).as_py() or 0.0),
        }

    def feature_table(self, good: pa.Table) -> pa.Table:
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

    def _write_npy(self, features: pa.Table, fs: pafs.FileSystem, root: str) -> None:
        arrays = features.column(S.FEATURES).combine_chunks().to_numpy_ndarray()
        for video_id, array in zip(features.column(S.VIDEO_ID).to_pylist(), arrays, strict=True):
            buf = io.BytesIO()
            np.save(buf, array.astype(np.float32))
            st.write_bytes(buf.getvalue(), fs, f"{root}/{NPY_DIR}/{st.safe_filename(video_id)}.npy")

    def on_write_complete(self, write_result) -> None:
        stats: dict[str, Any] = {"ok": 0, "frames": 0, "failed": collections.Counter(), DECODE_SECONDS: 0.0, INFER_SECONDS: 0.0}
        for r in write_result.write_returns:
            for key in ("ok", "frames", DECODE_SECONDS, INFER_SECONDS):
                stats[key] += r[key]
            stats["failed"].update(r["failed"])
        stats["failed"] = dict(stats["failed"])
        self.stats = stats


@dataclass
class OutputState:
    """What an output folder already holds."""

    done: set[str]
    dead: set[str]
    provenance: dict[str, Any] | None


def output_state(fs: pafs.FileSystem, root: str) -> OutputState:
    features = st.list_files(fs, f"{root}/{FEATURES_DIR}", ".parquet")
    prov = S.read_provenance(pq.read_schema(features[0], filesystem=fs)) if features else None
    done = set(st.read_column(fs, f"{root}/{FEATURES_DIR}", S.VIDEO_ID).to_pylist())
    dead = set(st.read_column(fs, f"{root}/{DEAD_LETTERS_DIR}", S.VIDEO_ID).to_pylist())
    return OutputState(done, dead, prov)


def resolve_device(config: Config) -> str:
    import ray

    choice = str(config.resources.use_gpu).lower()
    if choice == "auto":
        return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return "gpu" if choice == "true" else "cpu"


def tsn_spec(config: Config, weights: str | None, device: str) -> TSNSpec:
    precision = config.extract.precision
    if precision == "auto":
        precision = "float16" if device == "gpu" else "float32"
    if precision == "float16" and device == "cpu":
        raise ConfigError("extract.precision=float16 needs GPUs; none are used (resources.use_gpu, or no GPU in the cluster)")
    res = config.resources
    return TSNSpec(
        depth=config.model.num_layers,
        image_mean=config.model.image_mean,
        image_std=config.model.image_std,
        weights=weights,
        seed=config.extract.seed,
        device=device,
        precision=precision,
        threads=res.tsn_threads or max(1, int(res.tsn_cpus)),
        frames_per_forward=res.tsn_frames_per_forward,
        num_segments=config.infer.seg_num,
        target_size=config.infer.target_size,
        out_dtype=config.output.dtype,
    )


def weights_fingerprint(config: Config, weights: str | None) -> tuple[str, int]:
    """Loads the weights once in the driver: a bad file fails here, before any video is touched."""
    from vtplatform.models.tsn import TSNConfig, load_backbone
    from vtplatform.models.weights import WeightsError

    tsn_config = TSNConfig(config.model.num_layers, config.model.image_mean, config.model.image_std)
    try:
        with st.local_copy(weights, config.storage) if weights else contextlib.nullcontext() as local:
            _, fingerprint = load_backbone(tsn_config, local, config.extract.seed)
    except (WeightsError, OSError) as exc:
        raise ConfigError(f"cannot load TSN weights {st.redact(str(weights))}: {st.redact(str(exc))}") from exc
    return fingerprint, tsn_config.feature_dim


def run_extract(
    config: Config, manifest: str, save_dir: str, weights: str | None = None, retry_failed: bool = False
) -> ExtractSummary:
    """Extracts features for every manifest video not yet in ``save_dir``. Needs ``ray.init()``."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    start = time.perf_counter()
    config = replace(config, storage=st.resolve_storage(config.storage))
    fs, root = st.filesystem(save_dir, config.storage)
    st.check_writable(fs, root, save_dir)
    device = resolve_device(config)
    spec = tsn_spec(config, weights, device)
    fingerprint, feature_dim = weights_fingerprint(config, weights)
    prov = provenance(config, fingerprint, feature_dim, spec.precision)
    state = output_state(fs, root)
    if state.provenance is not None and S.signature_diff(state.provenance, prov):
        raise ConfigError(
            f"{st.redact(save_dir)} holds features made differently ({'; '.join(S.signature_diff(state.provenance, prov))}); "
            "use another --save_dir or the same model, weights and settings"
        )
    try:
        entries = read_manifest(manifest, config.storage)
    except OSError as exc:  # the store refused to list or read the manifest
        raise ConfigError(f"cannot read manifest {st.redact(manifest)}: {st.redact(str(exc))}") from exc
    summary = ExtractSummary(
        save_dir=st.redact(st.canonical_uri(save_dir)),
        manifest_entries=len(entries) + len(entries.rejected) + entries.duplicates,
        duplicates=entries.duplicates,
        device=device,
    )
    skip = state.done if retry_failed else state.done | state.dead
    _record_rejected(entries.rejected, skip, fs, root, summary)
    ids = entries.entries.column(S.VIDEO_ID).to_pylist()
    todo = entries.entries.filter(pa.array([v not in skip for v in ids], pa.bool_())) if ids else entries.entries
    summary.skipped = len(ids) - todo.num_rows
    summary.submitted = todo.num_rows
    log.info("%d videos to process, %d already done, on %s", todo.num_rows, summary.skipped, device)
    if todo.num_rows:
        schema = S.feature_schema(config.infer.seg_num, feature_dim, config.output.dtype, prov)
        sink = FeatureSink(save_dir, config.storage, schema, config.output.format == "npy", config.output.rows_per_file)
        res = config.resources
        ds = ray.data.from_arrow(_blocks(todo.select([S.VIDEO_ID, S.URI]), res.decode_batch_size))
        ds = ds.map_batches(
            decode_videos,
            batch_size=res.decode_batch_size,
            batch_format="pyarrow",
            compute=TaskPoolStrategy(size=res.decode_concurrency),
            fn_kwargs={"options": decode_options(config), "storage": config.storage},
            **decode_resources(config),
        )
        ds = ds.map_batches(
            TSNStage,
            batch_size=res.tsn_batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=res.tsn_actors),
            fn_constructor_kwargs={"spec": spec, "storage": config.storage},
            **tsn_resources(config, device == "gpu"),
        )
        ds.write_datasink(sink, concurrency=res.writer_concurrency)
        summary.succeeded = sink.stats["ok"]
        summary.frames = sink.stats["frames"]
        summary.decode_seconds = sink.stats[DECODE_SECONDS]
        summary.infer_seconds = sink.stats[INFER_SECONDS]
        for reason, count in sink.stats["failed"].items():
            summary.failed[reason] = summary.failed.get(reason, 0) + count
    finalize_output(fs, root, expected=set(todo.column(S.VIDEO_ID).to_pylist()))
    summary.elapsed_seconds = time.perf_counter() - start
    st.write_bytes(json.dumps(asdict(summary), indent=2).encode(), fs, f"{root}/{RUNS_DIR}/{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}.json")
    return summary


def _blocks(table: pa.Table, rows_per_task: int, max_blocks: int = 10_000) -> list[pa.Table]:
    """Input blocks for the decode stage: one per task, up to ``max_blocks`` blocks."""
    rows = max(rows_per_task, -(-table.num_rows // max_blocks))
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def _record_rejected(rejected: list[dict], skip: set[str], fs: pafs.FileSystem, root: str, summary: ExtractSummary) -> None:
    new = [r for r in rejected if r[S.VIDEO_ID] not in skip]
    for r in rejected:
        reason = f"{r[S.STAGE]}/{r[S.ERROR_TYPE]}"
        if r[S.VIDEO_ID] in skip:
            summary.skipped += 1
        else:
            summary.failed[reason] = summary.failed.get(reason, 0) + 1
            log.warning("manifest entry rejected: %s", r[S.MESSAGE])
    if new:
        name = _part_name([r[S.VIDEO_ID] for r in new]).replace("part-", "manifest-")
        st.write_parquet(dead_letter_table(new), fs, f"{root}/{DEAD_LETTERS_DIR}/{name}")


def finalize_output(fs: pafs.FileSystem, root: str, expected: set[str]) -> None:
    """Checks that every submitted video landed somewhere, removes repeated feature rows a
    retried write task could leave, and compacts the dead letters: one row per video, the latest
    attempt, none for videos that have features now."""
    feature_dir, dead_dir = f"{root}/{FEATURES_DIR}", f"{root}/{DEAD_LETTERS_DIR}"
    _drop_repeated_features(fs, feature_dir)
    done = set(st.read_column(fs, feature_dir, S.VIDEO_ID).to_pylist())
    files = st.list_files(fs, dead_dir, ".parquet")
    dead = pa.concat_tables([pq.read_table(f, filesystem=fs, schema=S.DEAD_LETTER_SCHEMA) for f in files]) if files else S.DEAD_LETTER_SCHEMA.empty_table()
    lost = expected - done - set(dead.column(S.VIDEO_ID).to_pylist())
    if lost:
        raise RuntimeError(f"{len(lost)} submitted videos reached neither features nor dead letters, e.g. {sorted(lost)[:3]}")
    latest: dict[str, dict] = {}
    for row in sorted(dead.to_pylist(), key=lambda r: r[S.FAILED_AT]):
        if row[S.VIDEO_ID] not in done:
            latest[row[S.VIDEO_ID]] = row
    if len(files) <= 1 and len(latest) == dead.num_rows:
        return
    compacted = pa.Table.from_pylist(list(latest.values()), schema=S.DEAD_LETTER_SCHEMA)
    name = _part_name(list(latest)).replace("part-", "compacted-")
    if compacted.num_rows:
        st.write_parquet(compacted, fs, f"{dead_dir}/{name}")
    for f in files:
        if not f.endswith(name):
            fs.delete_file(f)


def _drop_repeated_features(fs: pafs.FileSystem, feature_dir: str) -> None:
    seen: set[str] = set()
    for path in st.list_files(fs, feature_dir, ".parquet"):
        ids = pq.read_table(path, columns=[S.VIDEO_ID], filesystem=fs).column(S.VIDEO_ID).to_pylist()
        repeated = [i for i in ids if i in seen]
        seen.update(ids)
        if not repeated:
            continue
        log.warning("%s repeats %d rows already written elsewhere; rewriting it without them", path, len(repeated))
        table = pq.read_table(path, filesystem=fs)
        keep = table.filter(pc.invert(pc.is_in(table.column(S.VIDEO_ID), pa.array(repeated))))
        if keep.num_rows:
            st.write_parquet(keep.replace_schema_metadata(table.schema.metadata), fs, path)
        else:
            fs.delete_file(path)
