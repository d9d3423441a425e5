"""``timeline/``: a video's TSN features at ``tag.timeline_fps`` frames a second of presentation
time (``schema.timeline_schema``, one row per timeline frame: ``video_id``, ``t_seconds``,
``features``, and on the last chunk's frames ``video_end_s``), written from the timeline chunk
rows, each frame once even where chunks overlap.
The schema metadata records how the features were made and the timeline's settings: what a new
AttentionLSTM needs to tag windows again without decoding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import ConfigError, StorageSection
from vtplatform.outputs import Output
from vtplatform.outputs.compaction import keep_first


class TimelineOutput(Output):
    """``store``: a timeline table of its own (a URI) instead of ``OUT/timeline``, which several
    jobs add to (the nightly's store). A store keeps every video's rows; a video is whole there once
    it has its last chunk's rows (``video_end_s``), and a reader takes only whole videos."""

    directory = S.TIMELINE_DIR
    takes = (S.CHUNK_ROWS,)
    keys = (S.VIDEO_ID, S.T_SECONDS)
    decides_done = False  # the windows table says when a video's chunks are all in

    def __init__(self, schema: pa.Schema, store: str | None = None, storage: StorageSection | None = None):
        self.schema = schema
        self.store, self.storage = store, storage
        tensor = schema.field(S.FEATURES).type
        self.dim, self.dtype = tensor.shape[0], np.dtype(tensor.value_type.to_pandas_dtype())

    def _folder(self, fs: pafs.FileSystem, root: str) -> tuple[pafs.FileSystem, str]:
        if self.store is None:
            return fs, f"{root}/{self.directory}"
        return st.filesystem(self.store, self.storage or StorageSection())

    def write(self, rows: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        fs, folder = self._folder(fs, root)
        st.write_parquet(self.table(rows), fs, f"{folder}/{part}")

    def table(self, rows: pa.Table) -> pa.Table:
        ids, uris, times, ends, feats = [], [], [], [], []
        columns = [rows.column(c).to_pylist() for c in (S.VIDEO_ID, S.URI, S.NEW_FROM, S.T_SECONDS, S.VIDEO_END_S)]
        for vid, uri, new_from, t, end, raw in zip(*columns, S.binary_views(rows.column(S.FEATURES)), strict=True):
            n = len(t) - new_from
            ids, uris, times, ends = ids + [vid] * n, uris + [uri] * n, times + t[new_from:], ends + [end] * n
            feats.append(raw.view(self.dtype).reshape(len(t), self.dim)[new_from:])
        return pa.table(
            {
                S.VIDEO_ID: pa.array(ids, pa.string()),
                S.T_SECONDS: pa.array(times, pa.float64()),
                S.FEATURES: S.features_array(np.concatenate(feats), self.dtype.name),
                S.VIDEO_END_S: pa.array(ends, pa.float64()),
                S.URI: pa.array(uris, pa.string()),
            },
            schema=self.schema,
        )

    def finalize(self, fs: pafs.FileSystem, root: str, done: pa.Array) -> None:
        """Each frame once; in ``OUT/timeline`` only the videos done, in a store every video (others'
        rows are not this job's to drop; a video's rows from a killed run are the same frames)."""
        store_fs, folder = self._folder(fs, root)
        keep_first(store_fs, folder, self.keys, only=done if self.store is None else None)

    def existing_schema(self, fs: pafs.FileSystem, root: str) -> pa.Schema | None:
        store_fs, folder = self._folder(fs, root)
        parts = st.list_files(store_fs, folder, ".parquet")
        return pq.read_schema(parts[0], filesystem=store_fs) if parts else None

    def check(self, fs: pafs.FileSystem, root: str) -> None:
        """Refuses a store of features made otherwise, or at another rate (the windows it can serve)."""
        existing = self.existing_schema(fs, root)
        old, made = (S.read_provenance(existing) if existing is not None else None), S.read_provenance(self.schema)
        if old is None or made is None:
            return
        diff = S.signature_diff(
            {k: v for k, v in old.items() if k != "timeline"}, {k: v for k, v in made.items() if k != "timeline"}
        )
        if diff or old.get("timeline", {}).get("timeline_fps") != made.get("timeline", {}).get("timeline_fps"):
            where = self.store or f"{root}/{self.directory}"
            raise ConfigError(
                f"{st.redact(where)} holds timeline features made differently ({'; '.join(diff) or 'timeline_fps'}); "
                "use another timeline store or the same TSN and tag.timeline_fps"
            )
