"""``features/``: the feature table (``schema.feature_schema``), one row per video: its TSN features
as a ``[num_segments, feature_dim]`` tensor, the sampled frame indices and the video's facts; with
``output.format=npy`` also the seed's ``npy/<video_id>.npy`` files. The schema metadata records
how the features were made (``stages.tsn.provenance``), and an OUT holding features made
differently is refused."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import ConfigError
from vtplatform.outputs import Output


def check_same_extractor(existing: pa.Schema | None, prov: dict[str, Any], where: str) -> None:
    """Refuses to add features to a table made with another model, weights or settings."""
    old = S.read_provenance(existing) if existing is not None else None
    diff = S.signature_diff(old, prov) if old is not None else []
    if diff:
        raise ConfigError(
            f"{st.redact(where)} holds features made differently ({'; '.join(diff)}); "
            "use another --save_dir or the same model, weights and settings"
        )


class FeatureOutput(Output):
    directory = S.FEATURES_DIR

    def __init__(self, schema: pa.Schema, write_npy: bool, where: str):
        self.schema = schema
        self.write_npy = write_npy
        self.where = where  # the OUT, as the user gave it, for messages

    def check(self, fs: pafs.FileSystem, root: str) -> None:
        check_same_extractor(self.existing_schema(fs, root), S.read_provenance(self.schema), self.where)

    def write(self, rows: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        features = self.table(rows)
        st.write_parquet(features, fs, f"{root}/{self.directory}/{part}")
        if self.write_npy:
            arrays = features.column(S.FEATURES).combine_chunks().to_numpy_ndarray()
            for video_id, array in zip(features.column(S.VIDEO_ID).to_pylist(), arrays, strict=True):
                buf = io.BytesIO()
                np.save(buf, array.astype(np.float32))
                st.write_bytes(buf.getvalue(), fs, f"{root}/{S.NPY_DIR}/{st.safe_filename(video_id)}.npy")

    def table(self, rows: pa.Table) -> pa.Table:
        tensor_type = self.schema.field(S.FEATURES).type
        seg, dim = tensor_type.shape
        dtype = np.dtype(tensor_type.value_type.to_pandas_dtype())
        feats = np.stack([v.view(dtype).reshape(seg, dim) for v in S.binary_views(rows.column(S.FEATURES))])
        indices = pc.list_flatten(rows.column(S.FRAME_INDICES).combine_chunks()).cast(pa.int32())
        columns = {
            S.VIDEO_ID: rows.column(S.VIDEO_ID),
            S.URI: rows.column(S.URI),
            S.FEATURES: S.features_array(feats, dtype.name),
            S.NUM_FRAMES: rows.column(S.NUM_FRAMES),
            S.FRAME_INDICES: pa.FixedSizeListArray.from_arrays(indices, seg),
            S.FPS: rows.column(S.FPS),
            S.WIDTH: rows.column(S.WIDTH),
            S.HEIGHT: rows.column(S.HEIGHT),
            S.DECODER: rows.column(S.DECODER),
        }
        return pa.table(columns, schema=self.schema)
