"""The per-video job runner: extraction, tagging and the frame cache are each a ``VideoJob``
(its stages and its outputs), and ``run_video_job`` does the rest, the same way for all three::

    manifest -> plan (skip what is done) -> the job's stages -> ResultSink -> finalize -> summary

A job's rows travel with ``stage``/``error_type``/``message`` columns that are null for good
rows. The writer (``ResultSink``) writes the good rows through the job's ``Output`` objects and
the failed ones to ``dead_letters/``; part files are named from the videos they hold and
written atomically, so a rerun can skip everything already written. ``finalize_output`` then
checks that every submitted video landed somewhere and compacts the dead letters.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import Datasink, TaskPoolStrategy

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.manifest import Manifest, read_manifest
from vtplatform.memory import peak_rss_mb
from vtplatform.segments import row_keys, video_rows

log = logging.getLogger(__name__)


# Per-video seconds each stage adds to its rows, summed by the writer for the summary.
STAGE_SECONDS = {
    "decode": S.DECODE_SECONDS,
    "preprocess": S.PREPROCESS_SECONDS,  # in the decode tasks, after decoding: RGB conversion, scale, crop
    "tsn": S.INFER_SECONDS,
    "lstm": S.TAG_SECONDS,
}
# Per-row memory figures of model actors (``memory.ActorMemory``: growth over the loaded model, and
# the most one call added), of which the writer keeps the largest for the summary.
STAGE_PEAK_MB = {"tsn": S.TSN_PEAK_MB, "tsn call": S.TSN_CALL_MB}


class Output(Protocol):
    """One kind of file a job writes from its good rows (a table under ``directory``, .npy, JSON)."""

    directory: str

    def write(self, good: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None: ...


def dead_letter_table(rows: list[dict]) -> pa.Table:
    now = dt.datetime.now(dt.timezone.utc)
    return pa.Table.from_pylist([{**r, S.FAILED_AT: now} for r in rows], schema=S.DEAD_LETTER_SCHEMA)


def map_cpu_tasks(
    ds, fn, *, batch_size: int | None, num_cpus: float, concurrency: int | None, max_retries: int, **kwargs
):
    """``ds.map_batches(fn)`` on pyarrow batches as Ray CPU tasks, with a bounded retry count.

    Ray Data retries a task whose worker died (say, a decoder crashed on one video) forever by
    default, which would stall the job; ``max_retries`` bounds it. Ray 2.60 takes it only through
    ``ray_remote_args_fn``, deprecated for Ray 2.64 (the pinned minor keeps it), so that warning is
    silenced here. A ``ray_remote_args_fn`` also keeps these tasks from being fused into a
    following actor stage: they stay parallel CPU tasks.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
        return ds.map_batches(
            fn,
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=TaskPoolStrategy(size=concurrency),
            num_cpus=num_cpus,
            ray_remote_args_fn=functools.partial(dict, max_retries=max_retries),
            **kwargs,
        )


def blocks_dataset(blocks: list[pa.Table]):
    """A Ray Dataset of these Arrow tables, one block each.

    Not ``ray.data.from_arrow``: that reads each block's metadata in a remote task asking for a
    whole CPU, which never comes on a small cluster whose CPUs the job's own actors or training
    workers hold (a TSN worker streaming its samples on a 1-CPU Ray waited forever). This reads
    it here."""
    return ray.data.from_blocks(blocks)


def first_stage_input(todo: pa.Table, config) -> list[pa.Table]:
    """The per-video jobs' input blocks: ``(video_id, uri, size_bytes)`` rows, sizes filled in for
    local files, grouped by ``resources.decode_batch_size`` and ``resources.decode_task_mb``."""
    table = with_local_sizes(todo.select([S.VIDEO_ID, S.URI, S.SIZE_BYTES]))
    res = config.resources
    return input_blocks(table, res.decode_batch_size, res.decode_task_mb << 20)


def with_local_sizes(table: pa.Table, chunk: int = 8192) -> pa.Table:
    """Fills unknown sizes of local files from the disk (a stat costs microseconds; on S3 only
    a listing gives sizes, and a HEAD per object would cost more than it saves). A file the
    driver cannot stat gets ``ABSENT`` (-1): it will fail at read, in a batch of its own kind.
    A slice at a time, so that the Python strings of a long manifest never exist all at once."""
    filled = []
    for offset in range(0, table.num_rows, chunk):
        part = table.slice(offset, chunk)
        sizes = part.column(S.SIZE_BYTES).to_pylist()
        for i, uri in enumerate(part.column(S.URI).to_pylist()):
            if sizes[i] is None and not st.is_s3(uri):
                try:
                    sizes[i] = os.stat(uri).st_size
                except OSError:
                    sizes[i] = ABSENT
        filled.append(pa.array(sizes, pa.int64()))
    column = pa.chunked_array(filled, pa.int64())
    return table.set_column(table.schema.get_field_index(S.SIZE_BYTES), S.SIZE_BYTES, column)


ABSENT = -1  # size_bytes of a local file the driver could not stat
ABSENT_PER_TASK = 2048  # such entries cost a failed open each: many share a task and a block


def input_blocks(
    table: pa.Table, videos_per_task: int, bytes_per_task: int | None = None, max_blocks: int = 10_000
) -> list[pa.Table]:
    """The first stage's blocks, one per task: at most ``videos_per_task`` videos and, where file
    sizes are known (a ``size_bytes`` column), at most ``bytes_per_task`` of video unless one
    file alone is bigger, so that long videos get tasks of their own. At most ``max_blocks``."""
    rows = max(videos_per_task, -(-table.num_rows // max_blocks))
    if bytes_per_task is None or S.SIZE_BYTES not in table.column_names:
        return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]
    sizes = pc.fill_null(table.column(S.SIZE_BYTES), 0).to_numpy()
    absent = sizes == ABSENT
    if absent.any():  # entries that fail at open: thousands to a task, not one task per few videos
        gone = table.filter(pa.array(absent))
        step = max(rows, ABSENT_PER_TASK)
        rest = input_blocks(table.filter(pa.array(~absent)), videos_per_task, bytes_per_task, max_blocks)
        return rest + [gone.slice(i, step) for i in range(0, gone.num_rows, step)]
    blocks, start, total = [], 0, 0
    for i, size in enumerate(sizes.tolist()):
        if i > start and (i - start >= rows or total + size > bytes_per_task):
            blocks.append(table.slice(start, i - start))
            start, total = i, 0
        total += size
    if table.num_rows > start:
        blocks.append(table.slice(start))
    return blocks


class ResultSink(Datasink):
    """The writer stage. Each write task gets at least ``rows_per_file`` rows, writes the good ones
    through every output and the failed ones to one dead-letter part, and returns its counts."""

    def __init__(
        self,
        save_dir: str,
        storage: StorageSection,
        outputs: Sequence[Output],
        rows_per_file: int,
        counters: Sequence[str] = (),
    ):
        self.save_dir = save_dir.rstrip("/")
        self.storage = storage
        self.outputs = list(outputs)
        self.rows_per_file = rows_per_file
        self.counters = tuple(counters)  # numeric columns of the good rows, summed for the summary
        self.stats: dict[str, Any] = {}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "ResultWriter"

    def write(self, blocks, ctx) -> dict[str, Any]:
        tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"ok": 0, "failed": {}, "seconds": {}, "counts": {}, "peak_mb": {}}
        table = pa.concat_tables(tables)
        fs, root = st.filesystem(self.save_dir, self.storage)
        failed_mask = pc.is_valid(table.column(S.ERROR_TYPE))
        good, bad = table.filter(pc.invert(failed_mask)), table.filter(failed_mask)
        if good.num_rows:
            part = st.part_name(row_keys(good))
            for output in self.outputs:
                output.write(good, fs, root, part)
        if bad.num_rows:
            rows = bad.select([S.VIDEO_ID, S.URI, S.STAGE, S.ERROR_TYPE, S.MESSAGE]).to_pylist()
            st.write_parquet(
                dead_letter_table(rows),
                fs,
                f"{root}/{S.DEAD_LETTERS_DIR}/{st.part_name(bad.column(S.VIDEO_ID).to_pylist())}",
            )
        reasons = collections.Counter(
            f"{s}/{e}"
            for s, e in zip(bad.column(S.STAGE).to_pylist(), bad.column(S.ERROR_TYPE).to_pylist(), strict=True)
        )
        seconds = {
            stage: float(pc.sum(table.column(col)).as_py() or 0.0)
            for stage, col in STAGE_SECONDS.items()
            if col in table.column_names
        }
        counts = {c: int(pc.sum(good.column(c)).as_py() or 0) for c in self.counters}
        peaks = {
            stage: float(pc.max(table.column(col)).as_py() or 0.0)
            for stage, col in STAGE_PEAK_MB.items()
            if col in table.column_names
        }
        videos = video_rows(good).num_rows  # not the timeline chunks of tagging with segments
        return {"ok": videos, "failed": dict(reasons), "seconds": seconds, "counts": counts, "peak_mb": peaks}

    def on_write_complete(self, write_result) -> None:
        ok, failed, seconds, counts = 0, collections.Counter(), collections.Counter(), collections.Counter()
        peaks: dict[str, float] = {}
        for r in write_result.write_returns:
            ok += r["ok"]
            failed.update(r["failed"])
            seconds.update(r["seconds"])
            counts.update(r["counts"])
            for stage, mb in r["peak_mb"].items():
                peaks[stage] = max(peaks.get(stage, 0.0), mb)
        self.stats = {
            "ok": ok,
            "failed": dict(failed),
            "seconds": dict(seconds),
            "counts": dict(counts),
            "peak_mb": peaks,
        }


@dataclass
class OutputState:
    """What an output folder already holds (video ids as Arrow arrays: a million of them as Python
    strings in sets would cost the driver hundreds of MB)."""

    done: pa.Array
    dead: pa.Array
    schema: pa.Schema | None  # of the first part of the result table


def output_state(fs: pafs.FileSystem, root: str, result_dir: str) -> OutputState:
    parts = st.list_files(fs, f"{root}/{result_dir}", ".parquet")
    schema = pq.read_schema(parts[0], filesystem=fs) if parts else None
    done = st.read_column(fs, f"{root}/{result_dir}", S.VIDEO_ID).combine_chunks()
    dead = st.read_column(fs, f"{root}/{S.DEAD_LETTERS_DIR}", S.VIDEO_ID).combine_chunks()
    return OutputState(done, dead, schema)


@dataclass
class JobSummary:
    """The table every per-video job prints at the end."""

    job: str
    save_dir: str
    result_dir: str
    device: str = "cpu"
    manifest_entries: int = 0
    duplicates: int = 0
    skipped: int = 0  # already done by an earlier run
    submitted: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # "stage/error_type" -> count
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed per-video time of each stage
    counts: dict[str, int] = field(default_factory=dict)  # the job's own totals (the cache: frames, bytes)
    stage_peak_mb: dict[str, float] = field(default_factory=dict)  # model actors' memory growth after loading
    frames_per_video: int = 0
    elapsed_seconds: float = 0.0
    driver_peak_mb: float = 0.0  # the driver process's peak resident memory (VmHWM)

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def failed_at(self, stage: str) -> int:
        return sum(n for reason, n in self.failed.items() if reason.startswith(f"{stage}/"))

    def format(self) -> str:
        wall = max(self.elapsed_seconds, 1e-9)
        lines = [
            f"{self.job} summary ({self.device})",
            f"  manifest entries      {self.manifest_entries} ({self.duplicates} duplicates collapsed)",
            f"  skipped (done before) {self.skipped}",
            f"  processed now         {self.succeeded} ok, {self.failed_total} failed",
            f"  {'stage':<10} {'in':>8} {'failed':>8} {'out':>8} {'busy s':>10} {'s/video':>8}",
        ]
        entering = self.submitted + self.failed_at("manifest")
        for stage in ("manifest", *[s for s in STAGE_SECONDS if s in self.stage_seconds]):
            lost = self.failed_at(stage) + (self.failed_at("read") if stage == "decode" else 0)
            busy = self.stage_seconds.get(stage)
            per = f"{busy / max(entering, 1):8.2f}" if busy is not None else f"{'':>8}"
            busy_text = f"{busy:10.1f}" if busy is not None else f"{'':>10}"
            lines.append(f"  {stage:<10} {entering:>8} {lost:>8} {entering - lost:>8} {busy_text} {per}")
            entering -= lost
        lines += [f"    failed {reason:<28} {count}" for reason, count in sorted(self.failed.items())]
        lines += [f"  {name:<21} {count}" for name, count in sorted(self.counts.items())]
        if "tsn" in self.stage_peak_mb:
            lines.append(
                f"  tsn actor memory      +{self.stage_peak_mb['tsn']:.0f} MB at its peak over the loaded model, "
                f"+{self.stage_peak_mb.get('tsn call', 0.0):.0f} MB at most in one call"
            )
        frames = self.counts.get(S.CACHED_FRAMES, self.succeeded * self.frames_per_video)
        lines += [
            f"  wall time             {self.elapsed_seconds:.1f} s: {self.succeeded / wall:.2f} videos/s, "
            f"{frames / wall:.1f} frames/s",
            f"  driver peak memory    {self.driver_peak_mb:.0f} MB",
            f"  {self.result_dir:<21} {self.save_dir.rstrip('/')}/{self.result_dir}",
            f"  {'dead letters':<21} {self.save_dir.rstrip('/')}/{S.DEAD_LETTERS_DIR}",
        ]
        return "\n".join(lines)

    def add_sink_stats(self, stats: dict[str, Any]) -> None:
        self.succeeded = stats["ok"]
        for reason, count in stats["failed"].items():
            self.failed[reason] = self.failed.get(reason, 0) + count
        for stage, seconds in stats["seconds"].items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        for name, count in stats.get("counts", {}).items():
            self.counts[name] = self.counts.get(name, 0) + count
        for stage, mb in stats.get("peak_mb", {}).items():
            self.stage_peak_mb[stage] = max(self.stage_peak_mb.get(stage, 0.0), mb)


def plan_todo(
    entries: Manifest, state: OutputState, retry_failed: bool, fs: pafs.FileSystem, root: str, summary: JobSummary
) -> pa.Table:
    """The manifest entries still to process; records rejected manifest lines as dead letters."""
    skip = state.done if retry_failed else pa.concat_arrays([state.done, state.dead])
    rejected_ids = pa.array([r[S.VIDEO_ID] for r in entries.rejected], pa.string())
    known = pc.is_in(rejected_ids, value_set=skip).to_pylist()
    new = [r for r, done in zip(entries.rejected, known, strict=True) if not done]
    summary.skipped += len(entries.rejected) - len(new)
    for r in new:
        reason = f"{r[S.STAGE]}/{r[S.ERROR_TYPE]}"
        summary.failed[reason] = summary.failed.get(reason, 0) + 1
        log.warning("manifest entry rejected: %s", r[S.MESSAGE])
    if new:
        name = st.part_name([r[S.VIDEO_ID] for r in new], prefix="manifest")
        st.write_parquet(dead_letter_table(new), fs, f"{root}/{S.DEAD_LETTERS_DIR}/{name}")
    ids = entries.entries.column(S.VIDEO_ID)
    todo = entries.entries.filter(pc.invert(pc.is_in(ids, value_set=skip))) if len(skip) else entries.entries
    summary.manifest_entries = len(entries) + len(entries.rejected) + entries.duplicates
    summary.duplicates = entries.duplicates
    summary.skipped += len(ids) - todo.num_rows
    summary.submitted = todo.num_rows
    return todo


COMPACTED_ROWS_PER_FILE = 25_000  # dead letters per compacted part (a few MB held at a time)


def finalize_output(fs: pafs.FileSystem, root: str, result_dir: str, expected: pa.Array | None) -> None:
    """Checks that every submitted video (``expected``) landed somewhere, removes repeated result
    rows a retried write task could leave, and compacts the dead letters: one row per video, the
    latest attempt, none for videos that have results now. Only the ids and times of the dead
    letters are held at once; their rows are read and written a part at a time."""
    results, dead_dir = f"{root}/{result_dir}", f"{root}/{S.DEAD_LETTERS_DIR}"
    _drop_repeated_rows(fs, results)
    done = st.read_column(fs, results, S.VIDEO_ID).combine_chunks()
    files = st.list_files(fs, dead_dir, ".parquet")
    keys = [pq.read_table(f, columns=[S.VIDEO_ID, S.FAILED_AT], filesystem=fs) for f in files]
    sizes = np.array([k.num_rows for k in keys], np.int64)
    dead = (
        pa.concat_tables(keys).combine_chunks()
        if keys
        else pa.table(
            {
                S.VIDEO_ID: pa.array([], pa.string()),
                S.FAILED_AT: pa.array([], S.DEAD_LETTER_SCHEMA.field(S.FAILED_AT).type),
            }
        )
    )
    del keys
    if expected is not None and len(expected):
        landed = pa.concat_arrays([done, dead.column(S.VIDEO_ID).combine_chunks().cast(pa.string())])
        lost = expected.filter(pc.invert(pc.is_in(expected, value_set=landed)))
        if len(lost):
            raise RuntimeError(
                f"{len(lost)} submitted videos reached neither {result_dir} nor dead letters, "
                f"e.g. {sorted(lost.to_pylist())[:3]}"
            )
        del landed
    # The latest failure of each video that has no result: the first row of each id, sorted.
    dead = dead.append_column("row", pa.array(np.arange(dead.num_rows, dtype=np.int64)))
    dead = dead.filter(pc.invert(pc.is_in(dead.column(S.VIDEO_ID), value_set=done)))
    dead = dead.take(pc.sort_indices(dead, [(S.VIDEO_ID, "ascending"), (S.FAILED_AT, "descending")]))
    ids = dead.column(S.VIDEO_ID).to_numpy(zero_copy_only=False)
    first = np.r_[True, ids[1:] != ids[:-1]][: len(ids)]
    keep = np.sort(dead.column("row").to_numpy()[first])
    compacted_already = all(f.rsplit("/", 1)[-1].startswith("compacted-") for f in files)
    if len(keep) == sizes.sum() and (len(files) <= 1 or compacted_already):
        return
    name = st.part_name(ids[first].tolist(), prefix="compacted")
    del dead, ids, first
    offsets = np.r_[0, np.cumsum(sizes)]
    pending: list[pa.Table] = []
    written: set[str] = set()

    def flush() -> None:
        part = pa.concat_tables(pending)
        pending.clear()
        path = f"{dead_dir}/{name[:-8]}-{len(written):05d}.parquet"
        st.write_parquet(part, fs, path)
        written.add(path)

    for i, f in enumerate(files):
        rows = keep[np.searchsorted(keep, offsets[i]) : np.searchsorted(keep, offsets[i + 1])] - offsets[i]
        if len(rows):
            pending.append(pq.read_table(f, filesystem=fs, schema=S.DEAD_LETTER_SCHEMA).take(pa.array(rows)))
        if sum(t.num_rows for t in pending) >= COMPACTED_ROWS_PER_FILE:
            flush()
    if pending:
        flush()
    written_names = {w.rsplit("/", 1)[-1] for w in written}
    for f in files:
        if f.rsplit("/", 1)[-1] not in written_names:
            fs.delete_file(f)


def _drop_repeated_rows(fs: pafs.FileSystem, directory: str) -> None:
    """Rewrites the parts holding rows whose video_id an earlier part holds already."""
    parts = st.list_files(fs, directory, ".parquet")
    ids = [pq.read_table(p, columns=[S.VIDEO_ID], filesystem=fs).column(S.VIDEO_ID).combine_chunks() for p in parts]
    if not ids:
        return
    counts = pc.value_counts(pa.concat_arrays(ids))
    repeated_anywhere = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated_anywhere):
        return
    seen: set[str] = set()
    for path, part_ids in zip(parts, ids, strict=True):
        mine = part_ids.filter(pc.is_in(part_ids, value_set=repeated_anywhere)).to_pylist()
        repeated = [i for i in mine if i in seen]
        seen.update(mine)
        if not repeated:
            continue
        log.warning("%s repeats %d rows already written elsewhere; rewriting it without them", path, len(repeated))
        table = pq.read_table(path, filesystem=fs)
        keep = table.filter(pc.invert(pc.is_in(table.column(S.VIDEO_ID), pa.array(repeated))))
        if keep.num_rows:
            st.write_parquet(keep.replace_schema_metadata(table.schema.metadata), fs, path)
        else:
            fs.delete_file(path)


def write_run_summary(summary: Any, fs: pafs.FileSystem, root: str) -> None:
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}"
    st.write_bytes(
        json.dumps(asdict(summary), indent=2).encode(),
        fs,
        f"{root}/{S.RUNS_DIR}/{summary.job.replace(' ', '-')}-{stamp}.json",
    )


# -- the runner ------------------------------------------------------------------------------


@dataclass
class VideoJob:
    """What one per-video job supplies to ``run_video_job``: its stages and its outputs."""

    name: str  # in the summary: "extraction", "tagging", "frame cache"
    result_dir: str  # the folder whose video ids mean "done"
    device: str
    stages: Callable[[Any], Any]  # the input Dataset -> the rows the writer takes
    outputs: list[Output]
    writer_cpus: float
    frames_per_video: int = 0
    read_entries: Callable[[], Any] | None = None  # -> a Manifest-like list; default: the manifest
    input_blocks: Callable[[pa.Table], list[pa.Table]] | None = None  # todo -> blocks; default first_stage_input
    check_output: Callable[[pafs.FileSystem, str, OutputState], None] | None = None  # refuses a foreign folder
    done: Callable[[pafs.FileSystem, str, pa.Array], pa.Array] | None = None  # narrows the result ids to the done
    counters: tuple[str, ...] = ()  # numeric columns of the good rows summed into ``JobSummary.counts``
    finish: Callable[[pafs.FileSystem, str], None] | None = None  # after finalize (tagging's hub list)


def prepare_output(config: Config, save_dir: str) -> Config:
    """Checks that a job can write ``save_dir`` before anything else is loaded; returns the config
    with its storage resolved."""
    config = replace(config, storage=st.resolve_storage(config.storage))
    fs, root = st.filesystem(save_dir, config.storage)
    st.check_writable(fs, root, save_dir)
    return config


def read_entries(manifest: str, config: Config) -> Manifest:
    try:
        return read_manifest(manifest, config.storage)
    except OSError as exc:  # the store refused to list or read the manifest
        raise ConfigError(f"cannot read manifest {st.redact(manifest)}: {st.redact(str(exc))}") from exc


def run_video_job(
    config: Config, manifest: str, save_dir: str, job: VideoJob, retry_failed: bool, start: float
) -> JobSummary:
    """Runs ``job`` over every manifest entry not yet done in ``save_dir`` (``config`` from
    ``prepare_output``; ``start``: when the job began, for the summary). Needs ``ray.init()``."""
    fs, root = st.filesystem(save_dir, config.storage)
    state = output_state(fs, root, job.result_dir)
    if job.check_output is not None:
        job.check_output(fs, root, state)
    if job.done is not None:
        state = replace(state, done=job.done(fs, root, state.done))
    entries = job.read_entries() if job.read_entries is not None else read_entries(manifest, config)
    summary = JobSummary(
        job.name,
        st.redact(st.canonical_uri(save_dir)),
        job.result_dir,
        job.device,
        frames_per_video=job.frames_per_video,
    )
    todo = plan_todo(entries, state, retry_failed, fs, root, summary)
    log.info("%s: %d videos to process, %d already done, on %s", job.name, todo.num_rows, summary.skipped, job.device)
    if todo.num_rows:
        sink = ResultSink(save_dir, config.storage, job.outputs, config.output.rows_per_file, job.counters)
        blocks = job.input_blocks(todo) if job.input_blocks is not None else first_stage_input(todo, config)
        job.stages(blocks_dataset(blocks)).write_datasink(
            sink, concurrency=config.resources.writer_concurrency, ray_remote_args={"num_cpus": job.writer_cpus}
        )
        summary.add_sink_stats(sink.stats)
    finalize_output(fs, root, job.result_dir, expected=todo.column(S.VIDEO_ID).combine_chunks())
    if job.finish is not None:
        job.finish(fs, root)
    summary.elapsed_seconds = time.perf_counter() - start
    summary.driver_peak_mb = peak_rss_mb()
    write_run_summary(summary, fs, root)
    return summary
