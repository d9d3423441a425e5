"""The writer stage: ``ResultSink`` takes the rows the job's last stage yields, splits them by kind
(``schema.split_rows``), hands the good rows of each kind to the outputs that take that kind and
the failed ones to those that take ``schema.FAILED_ROWS`` (the dead letters), and returns what the
summary counts: videos done, failures by reason, per-stage seconds, the job's counters and the
model actors' memory.

Each write task gets at least ``rows_per_file`` rows (``output.rows_per_file``), so at any moment
at most that many finished videos are not yet on storage. Part names are derived from the rows'
keys, so a retried write task replaces its files instead of adding new ones.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import StorageSection
from vtplatform.outputs import Output

# Per-row seconds each stage adds to its rows, summed for the summary.
STAGE_SECONDS = {
    "read": S.READ_SECONDS,  # tagging from the stores
    "decode": S.DECODE_SECONDS,
    "preprocess": S.PREPROCESS_SECONDS,  # in the decode tasks, after decoding: RGB conversion, scale, crop
    "tsn": S.INFER_SECONDS,
    "lstm": S.TAG_SECONDS,
}
# Per-row memory figures of model actors (``memory.ActorMemory``), the largest kept for the summary.
STAGE_PEAK_MB = {"tsn": S.TSN_PEAK_MB, "tsn call": S.TSN_CALL_MB, "lstm": S.LSTM_PEAK_MB, "lstm call": S.LSTM_CALL_MB}
# Numeric columns summed into the summary's counts wherever rows carry them.
COUNTED = (S.TIMELINE_FRAMES, S.WINDOWS, S.CACHED_FRAMES, S.CACHED_BYTES)


def part_keys(rows: pa.Table) -> list[str]:
    """The keys that name a part file of these rows: the video ids, with the chunk for chunk rows
    (the chunks of one video land in different write tasks, whose parts must not collide)."""
    ids = rows.column(S.VIDEO_ID).to_pylist()
    if S.CHUNK not in rows.column_names:
        return ids
    return [f"{v}\n#{c}" for v, c in zip(ids, rows.column(S.CHUNK).to_pylist(), strict=True)]


class ResultSink(Datasink):
    def __init__(self, save_dir: str, storage: StorageSection, outputs: Sequence[Output], rows_per_file: int):
        self.save_dir = save_dir.rstrip("/")
        self.storage = storage
        self.outputs = list(outputs)
        self.rows_per_file = rows_per_file
        self.stats: dict[str, Any] = empty_stats()

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "ResultWriter"

    def write(self, blocks, ctx) -> dict[str, Any]:
        fs, root = st.filesystem(self.save_dir, self.storage)
        stats = empty_stats()
        tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return stats
        for kind, table in S.split_rows(pa.concat_tables(tables, promote_options="default")).items():
            failed = pc.is_valid(table.column(S.ERROR_TYPE)) if S.ERROR_TYPE in table.column_names else None
            good = table.filter(pc.invert(failed)) if failed is not None else table
            bad = table.filter(failed) if failed is not None else table.slice(0, 0)
            for rows, takes in ((good, kind), (bad, S.FAILED_ROWS)):
                if rows.num_rows:
                    part = st.part_name(part_keys(rows))
                    for output in self.outputs:
                        if takes in output.takes:
                            output.write(rows, fs, root, part)
            add_stats(stats, table, good, bad, kind)
        return stats

    def on_write_complete(self, write_result) -> None:
        for stats in write_result.write_returns:
            merge_stats(self.stats, stats)


def empty_stats() -> dict[str, Any]:
    return {"ok": 0, "failed": {}, "seconds": {}, "counts": {}, "peak_mb": {}}


def add_stats(stats: dict[str, Any], table: pa.Table, good: pa.Table, bad: pa.Table, kind: str) -> None:
    """Counts one block of rows: videos done (video rows only: not a video's timeline chunks),
    failures by ``stage/error_type``, stage seconds, counters and actor memory."""
    columns = set(table.column_names)
    if kind == S.VIDEO_ROWS:
        stats["ok"] += good.num_rows
    if bad.num_rows:
        reasons = collections.Counter(
            f"{s}/{e}"
            for s, e in zip(bad.column(S.STAGE).to_pylist(), bad.column(S.ERROR_TYPE).to_pylist(), strict=True)
        )
        _add(stats["failed"], reasons)
    seconds = {stage: float(pc.sum(table.column(c)).as_py() or 0) for stage, c in STAGE_SECONDS.items() if c in columns}
    _add(stats["seconds"], seconds)
    _add(stats["counts"], {c: int(pc.sum(good.column(c)).as_py() or 0) for c in COUNTED if c in columns})
    for stage, column in STAGE_PEAK_MB.items():
        if column in columns:
            mb = float(pc.max(table.column(column)).as_py() or 0.0)
            stats["peak_mb"][stage] = max(stats["peak_mb"].get(stage, 0.0), mb)


def merge_stats(into: dict[str, Any], stats: dict[str, Any]) -> None:
    into["ok"] += stats["ok"]
    for key in ("failed", "seconds", "counts"):
        _add(into[key], stats[key])
    for stage, mb in stats["peak_mb"].items():
        into["peak_mb"][stage] = max(into["peak_mb"].get(stage, 0.0), mb)


def _add(into: dict, more: dict) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0) + value
