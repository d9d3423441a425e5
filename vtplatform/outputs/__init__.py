"""The tables a job writes, one module each, and their one lifecycle.

An output (``Output``) declares

* ``directory``: its folder under the job's OUT, and ``schema``;
* ``takes``: the kinds of rows it writes (``schema.VIDEO_ROWS``, ``schema.CHUNK_ROWS``, or
  ``schema.FAILED_ROWS`` for the dead letters), none for a table made at the end of the run from
  other tables (spans) or by a stage itself (the frame cache's index);
* ``write(rows, fs, root, part)``: the writer stage hands it the good rows of its kind, a block at
  a time, and the part name to use (derived from the rows, so a rewrite replaces the file);
* ``check(fs, root)``: refuses an OUT that holds this table made differently;
* ``complete(fs, root)``: the videos this table holds whole, or None when it has no say in
  whether a video is done (a video is done when every output that has a say holds it whole);
* ``finalize(fs, root, done)``: after the run, through the one compaction helper
  (``compaction.keep_first``): each of its ``keys`` once, and derived tables made.

``sink.ResultSink`` is the writer stage that feeds them. Adding a table is one module here, and
adding its output to the jobs that write it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import ConfigError
from vtplatform.outputs.compaction import keep_first


class Output:
    """A table under ``OUT/<directory>/``, Parquet parts with ``schema``, one row per ``keys``. The
    defaults suit a table of one row per video that says a video is done when it holds its row."""

    directory: str = ""
    schema: pa.Schema | None = None
    takes: tuple[str, ...] = (S.VIDEO_ROWS,)
    keys: tuple[str, ...] = (S.VIDEO_ID,)
    decides_done: bool = True  # whether ``complete`` has a say in what is done

    def write(self, rows: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        """Writes ``rows`` (the good rows of its kind in one block) as one part."""
        table = self.table(rows)
        if table.num_rows:
            st.write_parquet(table, fs, f"{root}/{self.directory}/{part}")

    def table(self, rows: pa.Table) -> pa.Table:
        """The part to write for ``rows``: by default the schema's columns of the rows."""
        assert self.schema is not None
        return pa.table({f.name: rows.column(f.name) for f in self.schema}, schema=self.schema)

    def check(self, fs: pafs.FileSystem, root: str) -> None:
        """Refuses an OUT holding this table made differently (see ``check_signature``)."""

    def complete(self, fs: pafs.FileSystem, root: str) -> pa.Array | None:
        """The video ids this table holds whole; None when it has no say."""
        if not self.decides_done:
            return None
        return pc.unique(st.read_column(fs, f"{root}/{self.directory}", S.VIDEO_ID).combine_chunks())

    def finalize(self, fs: pafs.FileSystem, root: str, done: pa.Array) -> None:
        """After the run: each ``keys`` value once (a retried write, a video redone after a kill)."""
        keep_first(fs, f"{root}/{self.directory}", self.keys)

    def parts(self, fs: pafs.FileSystem, root: str) -> list[str]:
        return st.list_files(fs, f"{root}/{self.directory}", ".parquet")

    def existing_schema(self, fs: pafs.FileSystem, root: str) -> pa.Schema | None:
        """The schema of this table's first part in ``root``, None when it has none."""
        parts = self.parts(fs, root)
        return pq.read_schema(parts[0], filesystem=fs) if parts else None


def with_metadata(schema: pa.Schema, record: dict[str, Any]) -> pa.Schema:
    """``schema`` recording ``record`` (how its table was made) under ``schema.METADATA_KEY``."""
    return schema.with_metadata({S.METADATA_KEY: json.dumps(record, sort_keys=True).encode()})


def check_signature(
    existing: pa.Schema | None, made: dict[str, Any], keys: Sequence[str], where: str, what: str
) -> None:
    """Refuses to add to a table whose parts record other ``keys`` in their metadata than ``made``."""
    old = S.read_provenance(existing) if existing is not None else None
    if old is None:
        return
    diff = [k for k in keys if old.get(k) != made.get(k)]
    if diff:
        raise ConfigError(
            f"{st.redact(where)} holds {what} made with other settings ({', '.join(diff)} differ); "
            "use another --save_dir"
        )


def done_videos(outputs: Sequence[Output], fs: pafs.FileSystem, root: str) -> pa.Array:
    """The videos every output that has a say holds whole."""
    done: pa.Array | None = None
    for output in outputs:
        ids = output.complete(fs, root)
        if ids is None:
            continue
        done = ids if done is None else done.filter(pc.is_in(done, value_set=ids))
    return done if done is not None else pa.array([], pa.string())
