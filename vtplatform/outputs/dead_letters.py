"""``dead_letters/``: one row per video that could not be processed (``schema.DEAD_LETTER_SCHEMA``):
its stage, error type and message. The failed rows of every kind come here; manifest entries that
could not be used are written by the job before it starts. After a run each video keeps its
latest failure, none once it has a result, in few parts."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.fs as pafs

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.outputs import Output
from vtplatform.outputs.compaction import keep_first


def dead_letter_table(rows: list[dict]) -> pa.Table:
    """Failure rows (``video_id``, ``uri``, ``stage``, ``error_type``, ``message``), stamped now."""
    now = dt.datetime.now(dt.timezone.utc)
    return pa.Table.from_pylist([{**r, S.FAILED_AT: now} for r in rows], schema=S.DEAD_LETTER_SCHEMA)


def write_dead_letters(rows: list[dict], fs: pafs.FileSystem, root: str, prefix: str = "part") -> None:
    """``rows`` (failure rows) as one part under ``root/dead_letters``, named from their videos."""
    if rows:
        name = st.part_name([r[S.VIDEO_ID] for r in rows], prefix=prefix)
        st.write_parquet(dead_letter_table(rows), fs, f"{root}/{S.DEAD_LETTERS_DIR}/{name}")


def dead_video_ids(fs: pafs.FileSystem, root: str) -> pa.Array:
    """The videos with a dead letter in ``root``."""
    return st.read_column(fs, f"{root}/{S.DEAD_LETTERS_DIR}", S.VIDEO_ID).combine_chunks()


class DeadLetterOutput(Output):
    directory = S.DEAD_LETTERS_DIR
    schema = S.DEAD_LETTER_SCHEMA
    takes = (S.FAILED_ROWS,)
    decides_done = False

    def table(self, rows: pa.Table) -> pa.Table:
        return dead_letter_table(rows.select([S.VIDEO_ID, S.URI, S.STAGE, S.ERROR_TYPE, S.MESSAGE]).to_pylist())

    def finalize(self, fs: pafs.FileSystem, root: str, done: pa.Array) -> None:
        """The latest failure of each video that has no result, gathered into few parts."""
        keep_first(fs, f"{root}/{self.directory}", drop=done, newest_first=S.FAILED_AT, repack=True)
