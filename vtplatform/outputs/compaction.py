"""The one compaction every table shares: after a run, each key (a video, a video's window, a
video's timeline frame) keeps its first row, optionally only for some videos.

Why rows repeat: a write task that Ray retried after its worker died, a video redone after a
killed run, a dead letter written again by each run that retried it. Part files are written
atomically under names derived from their rows, so compaction only ever rewrites a part without
some of its rows (under the same name) or deletes it, and a second compaction finds nothing to do.
Only the key columns of the table are held at once; rows are read a part at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vtplatform import schema as S
from vtplatform import storage as st

log = logging.getLogger(__name__)

REPACKED_ROWS_PER_FILE = 25_000  # rows per part when small parts are gathered into few (dead letters)


def keep_first(
    fs: pafs.FileSystem,
    directory: str,
    keys: Sequence[str] = (S.VIDEO_ID,),
    *,
    only: pa.Array | None = None,
    drop: pa.Array | None = None,
    newest_first: str | None = None,
    repack: bool = False,
) -> int:
    """Rewrites the Parquet parts under ``directory`` so that each ``keys`` value keeps one row: the
    first in part-name and row order, or with ``newest_first`` (a timestamp column) the latest.
    ``only``: keep only rows of these video ids; ``drop``: none of these. ``repack``: write what is
    kept into few parts (``REPACKED_ROWS_PER_FILE`` rows, named ``compacted-...``) instead of
    rewriting each part in place, for tables of many small parts. Returns the rows removed."""
    parts = st.list_files(fs, directory, ".parquet")
    if not parts:
        return 0
    columns = list(dict.fromkeys([*keys, S.VIDEO_ID, *([newest_first] if newest_first else [])]))
    index = [pq.read_table(p, columns=columns, filesystem=fs) for p in parts]
    sizes = np.array([t.num_rows for t in index], np.int64)
    table = pa.concat_tables(index).combine_chunks() if len(index) > 1 else index[0].combine_chunks()
    del index
    table = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    order = [(k, "ascending") for k in keys]
    order += [(newest_first, "descending")] if newest_first else []
    table = table.take(pc.sort_indices(table, [*order, ("_row", "ascending")]))
    first = _first_of_each(table, keys)
    if only is not None:
        first &= pc.is_in(table.column(S.VIDEO_ID), value_set=only).to_numpy(zero_copy_only=False)
    if drop is not None and len(drop):
        first &= ~pc.is_in(table.column(S.VIDEO_ID), value_set=drop).to_numpy(zero_copy_only=False)
    keep = np.zeros(int(sizes.sum()), bool)
    keep[table.column("_row").to_numpy()[first]] = True
    removed = int((~keep).sum())
    if repack:
        names = sorted(table.filter(pa.array(first)).column(S.VIDEO_ID).to_pylist())
        _repack(fs, directory, parts, sizes, keep, names)
    elif removed:
        _rewrite_in_place(fs, parts, sizes, keep)
    if removed:
        log.info("%s: %d repeated or unwanted rows compacted away", st.redact(directory), removed)
    return removed


def _first_of_each(table: pa.Table, keys: Sequence[str]) -> np.ndarray:
    """Over rows sorted by ``keys``: True where a row's keys differ from the row before."""
    n = table.num_rows
    new = np.zeros(n, bool)
    if n:
        new[0] = True
    for key in keys:
        values = table.column(key).to_numpy(zero_copy_only=False)
        new[1:] |= values[1:] != values[:-1]
    return new


def _rewrite_in_place(fs: pafs.FileSystem, parts: list[str], sizes: np.ndarray, keep: np.ndarray) -> None:
    offsets = np.r_[0, np.cumsum(sizes)]
    for i, path in enumerate(parts):
        mask = keep[offsets[i] : offsets[i + 1]]
        if mask.all():
            continue
        if mask.any():
            part = pq.read_table(path, filesystem=fs)
            st.write_parquet(part.filter(pa.array(mask)).replace_schema_metadata(part.schema.metadata), fs, path)
        else:
            fs.delete_file(path)


def _repack(
    fs: pafs.FileSystem, directory: str, parts: list[str], sizes: np.ndarray, keep: np.ndarray, ids: list[str]
) -> None:
    """Writes the kept rows into ``compacted-<hash of ids>-NNNNN`` parts, then deletes the others;
    nothing when the table is already one part, or already compacted and whole."""
    compacted = all(p.rsplit("/", 1)[-1].startswith("compacted-") for p in parts)
    if keep.all() and (len(parts) <= 1 or compacted):
        return
    stem = st.part_name(ids, prefix="compacted")[: -len(".parquet")]
    offsets = np.r_[0, np.cumsum(sizes)]
    pending: list[pa.Table] = []
    written: set[str] = set()

    def flush() -> None:
        path = f"{directory}/{stem}-{len(written):05d}.parquet"
        st.write_parquet(pa.concat_tables(pending), fs, path)
        pending.clear()
        written.add(path.rsplit("/", 1)[-1])

    for i, path in enumerate(parts):
        rows = np.flatnonzero(keep[offsets[i] : offsets[i + 1]])
        if len(rows):
            part = pq.read_table(path, filesystem=fs)
            pending.append(part.take(pa.array(rows)).replace_schema_metadata(part.schema.metadata))
        if sum(t.num_rows for t in pending) >= REPACKED_ROWS_PER_FILE:
            flush()
    if pending:
        flush()
    for path in parts:
        if path.rsplit("/", 1)[-1] not in written:
            fs.delete_file(path)
