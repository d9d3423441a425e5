"""``timeline/``: a video's TSN features at ``tag.timeline_fps`` frames a second of presentation
time (``schema.timeline_schema``, one row per timeline frame: ``video_id``, ``t_seconds``,
``features``), written from the timeline chunk rows, each frame once even where chunks overlap.
The schema metadata records how the features were made and the timeline's settings: what a new
AttentionLSTM needs to tag windows again without decoding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from vtplatform import schema as S
from vtplatform.outputs import Output
from vtplatform.outputs.compaction import keep_first


class TimelineOutput(Output):
    directory = S.TIMELINE_DIR
    takes = (S.CHUNK_ROWS,)
    keys = (S.VIDEO_ID, S.T_SECONDS)
    decides_done = False  # the windows table says when a video's chunks are all in

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        tensor = schema.field(S.FEATURES).type
        self.dim, self.dtype = tensor.shape[0], np.dtype(tensor.value_type.to_pandas_dtype())

    def table(self, rows: pa.Table) -> pa.Table:
        ids, times, feats = [], [], []
        columns = [rows.column(c).to_pylist() for c in (S.VIDEO_ID, S.NEW_FROM, S.T_SECONDS)]
        for vid, new_from, t, raw in zip(*columns, S.binary_views(rows.column(S.FEATURES)), strict=True):
            ids += [vid] * (len(t) - new_from)
            times += t[new_from:]
            feats.append(raw.view(self.dtype).reshape(len(t), self.dim)[new_from:])
        return pa.table(
            {
                S.VIDEO_ID: pa.array(ids, pa.string()),
                S.T_SECONDS: pa.array(times, pa.float64()),
                S.FEATURES: S.features_array(np.concatenate(feats), self.dtype.name),
            },
            schema=self.schema,
        )

    def finalize(self, fs: pafs.FileSystem, root: str, done: pa.Array) -> None:
        keep_first(fs, f"{root}/{self.directory}", self.keys, only=done)
