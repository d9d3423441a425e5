"""``segments/``: the window tags, the tags of each time window along a video (``schema.SEGMENT_SCHEMA``, one row per
window: its start and end, top-k ids, names and probabilities, and the labels at or above the
threshold), written from the timeline chunk rows as they come. ``chunk``/``last_chunk`` record
which chunk held the window: a video is whole here once its last chunk and every chunk before it
are written, so a killed run's half-written videos are redone and their rows dropped."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.outputs import Output
from vtplatform.outputs.compaction import keep_first


class WindowTagOutput(Output):
    directory = S.SEGMENTS_DIR
    takes = (S.CHUNK_ROWS,)
    keys = (S.VIDEO_ID, S.WINDOW)

    def __init__(self, schema: pa.Schema, names: list[str] | None):
        self.schema = schema
        self.names = names

    def table(self, rows: pa.Table) -> pa.Table:
        columns = (S.VIDEO_ID, S.URI, S.CHUNK, S.LAST_CHUNK, S.WIN_INDEX, S.WIN_START, S.WIN_END)
        columns += (S.WIN_CLASS_IDS, S.WIN_PROBS, S.WIN_LABELS, S.WIN_LABEL_PROBS)
        out = []
        for vid, uri, chunk, last, *per_window in zip(*(rows.column(c).to_pylist() for c in columns), strict=True):
            for k, start, end, ids, probs, labels, label_probs in zip(*per_window, strict=True):
                out.append(
                    {
                        S.VIDEO_ID: vid,
                        S.URI: uri,
                        S.WINDOW: k,
                        S.START_S: start,
                        S.END_S: end,
                        S.CLASS_IDS: ids,
                        S.CLASS_NAMES: [self.names[i] for i in ids] if self.names else None,
                        S.PROBS: probs,
                        S.LABELS: labels,
                        S.LABEL_PROBS: label_probs,
                        S.CHUNK: chunk,
                        S.LAST_CHUNK: last,
                    }
                )
        return pa.Table.from_pylist(out, schema=self.schema)

    def complete(self, fs: pafs.FileSystem, root: str) -> pa.Array:
        """The videos whose windows are all here: the last chunk and every chunk before it."""
        table = read_parts(fs, f"{root}/{self.directory}", [S.VIDEO_ID, S.CHUNK, S.LAST_CHUNK])
        if table is None or not table.num_rows:
            return pa.array([], pa.string())
        last = table.filter(table.column(S.LAST_CHUNK)).group_by(S.VIDEO_ID).aggregate([(S.CHUNK, "max")])
        seen = table.group_by(S.VIDEO_ID).aggregate([(S.CHUNK, "count_distinct")])
        joined = last.join(seen, S.VIDEO_ID)
        whole = pc.equal(joined.column(f"{S.CHUNK}_count_distinct"), pc.add(joined.column(f"{S.CHUNK}_max"), 1))
        return joined.filter(whole).column(S.VIDEO_ID).combine_chunks()

    def finalize(self, fs: pafs.FileSystem, root: str, done: pa.Array) -> None:
        """Each window once, of the videos done only (a video that failed after some of its chunks
        were written, or a killed run's leftovers, which the next run redoes)."""
        keep_first(fs, f"{root}/{self.directory}", self.keys, only=done)


def read_parts(fs: pafs.FileSystem, directory: str, columns: list[str], ids: pa.Array | None = None) -> pa.Table | None:
    """``columns`` of every part under ``directory`` (of the videos ``ids`` only, when given)."""
    import pyarrow.parquet as pq

    parts = st.list_files(fs, directory, ".parquet")
    if not parts:
        return None
    tables = []
    for path in parts:
        table = pq.read_table(path, filesystem=fs, columns=columns)
        tables.append(table if ids is None else table.filter(pc.is_in(table.column(S.VIDEO_ID), value_set=ids)))
    return pa.concat_tables(tables)
