"""``tags/``: one row per video (``schema.TAG_SCHEMA``): the top-k class ids, names and
probabilities, best first, and the labels at or above the threshold. The schema metadata records
both models' weights and the tagging settings (``TAGGER_KEYS``); an OUT holding tags made
otherwise is refused. Options: the seed's per-video JSON (``json/<video_id>.json``) and, at the
end of a run, PaddleHub's list (``hub_results.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.labels import seed_json_bytes
from vtplatform.outputs import Output, check_signature
from vtplatform.outputs.compaction import keep_first

# What must match for tags to share one table (the rest of the metadata is informative).
TAGGER_KEYS = ("tsn_weights", "features", "lstm_weights", "top_k", "threshold", "label_fingerprint", "segments")


@dataclass(frozen=True)
class HubList:
    """PaddleHub's videotag list: the tags at or above ``threshold``, at most ``top_k`` a video."""

    threshold: float
    top_k: int


class TagOutput(Output):
    directory = S.TAGS_DIR

    def __init__(
        self,
        schema: pa.Schema,
        names: list[str] | None,
        where: str,
        seed_json: bool = False,
        hub: HubList | None = None,
    ):
        self.schema = schema
        self.names = names
        self.where = where
        self.seed_json = seed_json
        self.hub = hub

    def check(self, fs: pafs.FileSystem, root: str) -> None:
        made = S.read_provenance(self.schema) or {}
        check_signature(self.existing_schema(fs, root), made, TAGGER_KEYS, self.where, "tags")

    def write(self, rows: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        table = self.table(rows)
        st.write_parquet(table, fs, f"{root}/{self.directory}/{part}")
        if self.seed_json:
            for row in table.to_pylist():
                st.write_bytes(
                    seed_json_bytes(row), fs, f"{root}/{S.JSON_DIR}/{st.safe_filename(row[S.VIDEO_ID])}.json"
                )

    def table(self, rows: pa.Table) -> pa.Table:
        names = self.names
        named = [[names[i] for i in r] if names else None for r in rows.column(S.CLASS_IDS).to_pylist()]
        labelled = [[names[i] for i in r] if names else None for r in rows.column(S.LABELS).to_pylist()]
        columns = {
            S.VIDEO_ID: rows.column(S.VIDEO_ID),
            S.URI: rows.column(S.URI),
            S.CLASS_IDS: rows.column(S.CLASS_IDS),
            S.CLASS_NAMES: named,
            S.PROBS: rows.column(S.PROBS),
            S.LABELS: rows.column(S.LABELS),
            S.LABEL_NAMES: labelled,
        }
        return pa.table(columns, schema=self.schema)

    def finalize(self, fs: pafs.FileSystem, root: str, done: pa.Array) -> None:
        keep_first(fs, f"{root}/{self.directory}", self.keys)
        if self.hub is not None:
            write_hub_list(fs, root, self.hub)


def write_hub_list(fs: pafs.FileSystem, root: str, hub: HubList) -> None:
    """PaddleHub's videotag output for the whole tags table: ``[{"path": uri, "prediction": {name: p}}]``
    with the tags at or above ``hub.threshold``, at most ``hub.top_k`` per video (names, or ids
    without a label file)."""
    items = []
    for path in st.list_files(fs, f"{root}/{S.TAGS_DIR}", ".parquet"):
        table = pq.read_table(path, filesystem=fs, columns=[S.URI, S.CLASS_IDS, S.CLASS_NAMES, S.PROBS])
        for uri, ids, names, probs in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
            prediction: dict[str, float] = {}
            for key, p in list(zip(names or [str(i) for i in ids], probs, strict=True))[: hub.top_k]:
                if p >= hub.threshold:
                    prediction.setdefault(key, float(p))  # names repeat in label_3396.txt: keep the best
            items.append({"path": uri, "prediction": prediction})
    items.sort(key=lambda item: item["path"])
    st.write_bytes(json.dumps(items, ensure_ascii=False, indent=1).encode("utf-8"), fs, f"{root}/{S.HUB_FILE}")
