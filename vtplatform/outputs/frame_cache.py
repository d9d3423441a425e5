"""The decoded-frame cache's tables (``jobs/cache_frames.py``): ``frames/shard-*.parquet``, each
video's frames in row groups of its own, and ``index/``, one row per cached video
(``schema.FRAME_CACHE_INDEX_SCHEMA``), which says a video is done. The cache stage writes both
itself (a shard must come from the task that decoded its frames), so this output writes no rows:
it checks and records the cache's settings (``cache.json``) and compacts the index."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import vtplatform
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import ConfigError
from vtplatform.outputs import Output


def read_settings(fs: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    """The settings a cache at ``root`` was made with; None when there is no cache there."""
    path = f"{root}/{S.CACHE_SETTINGS_FILE}"
    if not st.exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def read_index(fs: pafs.FileSystem, root: str) -> pa.Table:
    """The index of a cache: one row per cached video (its first, should a retried task have
    indexed it twice)."""
    files = st.list_files(fs, f"{root}/{S.INDEX_DIR}", ".parquet")
    if not files:
        return S.FRAME_CACHE_INDEX_SCHEMA.empty_table()
    table = pa.concat_tables([pq.read_table(f, filesystem=fs, schema=S.FRAME_CACHE_INDEX_SCHEMA) for f in files])
    seen: set[str] = set()
    keep = []
    for i, vid in enumerate(table.column(S.VIDEO_ID).to_pylist()):
        if vid not in seen:
            seen.add(vid)
            keep.append(i)
    return table.take(pa.array(keep, pa.int64())) if len(keep) != table.num_rows else table


class FrameCacheOutput(Output):
    directory = S.INDEX_DIR
    schema = S.FRAME_CACHE_INDEX_SCHEMA
    takes = ()  # the cache stage writes its shards and index parts itself

    def __init__(self, settings: dict[str, Any], where: str):
        self.settings = settings
        self.where = where

    def check(self, fs: pafs.FileSystem, root: str) -> None:
        """Refuses a cache made with other settings; records the settings in a new one."""
        existing = read_settings(fs, root)
        if existing is not None and {k: existing.get(k) for k in self.settings} != self.settings:
            diff = [f"{k}: {existing.get(k)!r} != {v!r}" for k, v in self.settings.items() if existing.get(k) != v]
            raise ConfigError(
                f"{st.redact(self.where)} holds a cache made with other settings ({'; '.join(diff)}); "
                "use another --save_dir"
            )
        if existing is None:
            record = self.settings | {
                "vtplatform_version": vtplatform.__version__,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            st.write_bytes(json.dumps(record, indent=2).encode(), fs, f"{root}/{S.CACHE_SETTINGS_FILE}")
