"""``predictions/``: one row per video (``schema.PREDICTION_SCHEMA``): the top-k class ids, names
(from the label file; null without one) and probabilities, best first, of either model's
``jobs/predict.py``. The schema metadata records the model, its weights, the label set and k, and
an OUT holding predictions made otherwise is refused. With ``seed_json``, also the seed's
``json/result<i>.json``, ``i`` the video's place in the input list."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.labels import seed_json_bytes
from vtplatform.outputs import Output, check_signature

PREDICTION_KEYS = ("model", "weights", "label_fingerprint", "top_k")


class PredictionOutput(Output):
    directory = S.PREDICTIONS_DIR

    def __init__(self, schema: pa.Schema, names: list[str] | None, where: str, seed_json: bool = False):
        self.schema = schema
        self.names = names
        self.where = where
        self.seed_json = seed_json

    def check(self, fs: pafs.FileSystem, root: str) -> None:
        made = S.read_provenance(self.schema) or {}
        check_signature(self.existing_schema(fs, root), made, PREDICTION_KEYS, self.where, "predictions")

    def write(self, rows: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        table = self.table(rows)
        st.write_parquet(table, fs, f"{root}/{self.directory}/{part}")
        if self.seed_json:
            positions = rows.column(S.LIST_INDEX).to_pylist()
            for i, row in zip(positions, table.to_pylist(), strict=True):
                st.write_bytes(seed_json_bytes(row), fs, f"{root}/{S.JSON_DIR}/result{i}.json")

    def table(self, rows: pa.Table) -> pa.Table:
        names = self.names
        named = [[names[c] for c in r] if names else None for r in rows.column(S.CLASS_IDS).to_pylist()]
        columns = {
            S.VIDEO_ID: rows.column(S.VIDEO_ID),
            S.URI: rows.column(S.URI),
            S.CLASS_IDS: rows.column(S.CLASS_IDS),
            S.CLASS_NAMES: named,
            S.PROBS: rows.column(S.PROBS),
        }
        return pa.table(columns, schema=self.schema)
