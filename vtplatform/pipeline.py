"""The per-video job runner. Extraction, tagging, the frame cache and prediction are each a
``VideoJob``: the Ray Data stages its rows go through and the tables it writes (``outputs``);
``run_video_job`` does the rest, the same way for all of them::

    entries -> todo (skip what every output holds whole) -> stages -> writer (outputs.sink)
            -> finalize each output (outputs.compaction) -> summary

Rows are a video's own or a chunk of its timeline (``schema.ROW_KIND``), with ``stage``/
``error_type``/``message`` columns that are null for good rows; the writer hands each output the
good rows of the kinds it takes (``schema.split_rows``), and the failed ones to the dead letters. Part files are named from their rows and written
atomically, so a rerun skips everything already written and a retried write replaces its files.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
from ray.data import TaskPoolStrategy

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError
from vtplatform.manifest import Manifest, read_manifest
from vtplatform.memory import peak_rss_mb
from vtplatform.outputs import Output, done_videos
from vtplatform.outputs.dead_letters import DeadLetterOutput, dead_video_ids, write_dead_letters
from vtplatform.outputs.sink import STAGE_SECONDS, ResultSink

log = logging.getLogger(__name__)

Stage = Callable[[Any], Any]  # a Ray Dataset -> the Dataset with one more stage


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


@dataclass
class JobSummary:
    """The table every per-video job prints at the end."""

    job: str
    save_dir: str
    tables: list[str]  # the folders of the job's outputs (besides dead_letters)
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
    storage_retries: dict[str, int] = field(default_factory=dict)  # retried storage requests by reason (driver+workers)

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
            lost = self.failed_at(stage) + (
                self.failed_at("read") if stage == "decode" and "read" not in self.stage_seconds else 0
            )
            busy = self.stage_seconds.get(stage)
            per = f"{busy / max(entering, 1):8.2f}" if busy is not None else f"{'':>8}"
            busy_text = f"{busy:10.1f}" if busy is not None else f"{'':>10}"
            lines.append(f"  {stage:<10} {entering:>8} {lost:>8} {entering - lost:>8} {busy_text} {per}")
            entering -= lost
        lines += [f"    failed {reason:<28} {count}" for reason, count in sorted(self.failed.items())]
        lines += [f"  {name:<21} {count}" for name, count in sorted(self.counts.items())]
        for stage in ("tsn", "lstm"):
            if stage in self.stage_peak_mb:
                lines.append(
                    f"  {stage + ' actor memory':<21} +{self.stage_peak_mb[stage]:.0f} MB at its peak over "
                    f"the loaded model, +{self.stage_peak_mb.get(f'{stage} call', 0.0):.0f} MB at most in one call"
                )
        frames = self.counts.get(S.CACHED_FRAMES, self.succeeded * self.frames_per_video)
        lines += [
            f"  wall time             {self.elapsed_seconds:.1f} s: {self.succeeded / wall:.2f} videos/s, "
            f"{frames / wall:.1f} frames/s",
            f"  driver peak memory    {self.driver_peak_mb:.0f} MB",
            f"  storage retries       {st.format_retries(self.storage_retries)}",
        ]
        lines += [f"  {name:<21} {self.save_dir.rstrip('/')}/{name}" for name in self.tables]
        lines.append(f"  {'dead letters':<21} {self.save_dir.rstrip('/')}/{S.DEAD_LETTERS_DIR}")
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


def todo_entries(
    entries: Manifest,
    done: pa.Array,
    dead: pa.Array,
    retry_failed: bool,
    fs: pafs.FileSystem,
    root: str,
    summary: JobSummary,
) -> pa.Table:
    """The entries still to process (neither done nor, unless ``retry_failed``, dead-lettered);
    writes the rejected manifest lines as dead letters."""
    skip = done if retry_failed else pa.concat_arrays([done, dead.cast(pa.string())])
    rejected_ids = pa.array([r[S.VIDEO_ID] for r in entries.rejected], pa.string())
    known = pc.is_in(rejected_ids, value_set=skip).to_pylist()
    new = [r for r, seen in zip(entries.rejected, known, strict=True) if not seen]
    summary.skipped += len(entries.rejected) - len(new)
    for r in new:
        reason = f"{r[S.STAGE]}/{r[S.ERROR_TYPE]}"
        summary.failed[reason] = summary.failed.get(reason, 0) + 1
        log.warning("manifest entry rejected: %s", r[S.MESSAGE])
    write_dead_letters(new, fs, root, prefix="manifest")
    ids = entries.entries.column(S.VIDEO_ID)
    todo = entries.entries.filter(pc.invert(pc.is_in(ids, value_set=skip))) if len(skip) else entries.entries
    summary.manifest_entries = len(entries) + len(entries.rejected) + entries.duplicates
    summary.duplicates = entries.duplicates
    summary.skipped += len(ids) - todo.num_rows
    summary.submitted = todo.num_rows
    return todo


def write_rows(ds, config: Config, save_dir: str, outputs: Sequence[Output], writer_cpus: float = 0.0) -> dict:
    """Runs ``ds`` into the writer stage (``outputs.sink.ResultSink``) over ``outputs``; returns its
    counts for the summary. The caller finalizes the outputs (``finalize_outputs``)."""
    sink = ResultSink(save_dir, config.storage, outputs, config.output.rows_per_file)
    ds.write_datasink(sink, concurrency=config.resources.writer_concurrency, ray_remote_args={"num_cpus": writer_cpus})
    return sink.stats


def finalize_outputs(outputs: Sequence[Output], fs: pafs.FileSystem, root: str, expected: pa.Array | None) -> None:
    """After a run: checks that every submitted video (``expected``) is done or dead-lettered, then
    finalizes each output in order (compaction; derived tables such as spans come after the tables
    they are made from), with the videos done."""
    done = done_videos(outputs, fs, root)
    if expected is not None and len(expected):
        landed = pa.concat_arrays([done, dead_video_ids(fs, root).cast(pa.string())])
        lost = expected.filter(pc.invert(pc.is_in(expected, value_set=landed)))
        if len(lost):
            tables = " and ".join(o.directory for o in outputs if o.decides_done)
            raise RuntimeError(
                f"{len(lost)} submitted videos reached neither {tables} nor dead letters, "
                f"e.g. {sorted(lost.to_pylist())[:3]}"
            )
    for output in outputs:
        output.finalize(fs, root, done)


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
    """What one per-video job supplies to ``run_video_job``."""

    name: str  # in the summary: "extraction", "tagging", "frame cache", "prediction"
    device: str
    entries: Manifest  # the videos (or rows) to process
    stages: list[Stage]  # in order: the first takes ``blocks(todo)``, the writer takes the last one's rows
    outputs: list[Output]  # the tables written (the dead letters are added); whole in all, a video is done
    writer_cpus: float = 0.0
    frames_per_video: int = 0
    blocks: Callable[[pa.Table], list[pa.Table]] | None = None  # todo -> the first stage's blocks


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
    except st.StorageError:  # the store kept failing past the retry policy: not a configuration error
        raise
    except OSError as exc:  # the store refused to list or read the manifest
        raise ConfigError(f"cannot read manifest {st.redact(manifest)}: {st.redact(str(exc))}") from exc


def run_video_job(config: Config, save_dir: str, job: VideoJob, retry_failed: bool, start: float) -> JobSummary:
    """Runs ``job`` over every entry not yet done in ``save_dir`` (``config`` from
    ``prepare_output``; ``start``: when the job began, for the summary). Needs ``ray.init()``."""
    retries_before = st.storage_retries()
    fs, root = st.filesystem(save_dir, config.storage)
    outputs = [*job.outputs, DeadLetterOutput()]
    for output in outputs:
        output.check(fs, root)
    summary = JobSummary(
        job.name,
        st.redact(st.canonical_uri(save_dir)),
        [o.directory for o in job.outputs],
        job.device,
        frames_per_video=job.frames_per_video,
    )
    done = done_videos(outputs, fs, root)
    todo = todo_entries(job.entries, done, dead_video_ids(fs, root), retry_failed, fs, root, summary)
    log.info("%s: %d videos to process, %d already done, on %s", job.name, todo.num_rows, summary.skipped, job.device)
    if todo.num_rows:
        ds = blocks_dataset(job.blocks(todo) if job.blocks is not None else first_stage_input(todo, config))
        for stage in job.stages:
            ds = stage(ds)
        summary.add_sink_stats(write_rows(ds, config, save_dir, outputs, job.writer_cpus))
    finalize_outputs(outputs, fs, root, expected=todo.column(S.VIDEO_ID).combine_chunks())
    summary.elapsed_seconds = time.perf_counter() - start
    summary.driver_peak_mb = peak_rss_mb()
    summary.storage_retries = st.retries_since(retries_before)
    write_run_summary(summary, fs, root)
    return summary
