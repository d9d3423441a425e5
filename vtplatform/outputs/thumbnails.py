"""``thumbnails/``: small JPEGs for ``jobs/report.py``, so the report never decodes video:
``<video_id>.jpg`` (the middle sampled frame, from a video's row) and ``<video_id>/<window>.jpg``
(each window's middle frame, from the timeline chunk rows)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.outputs import Output


class ThumbnailOutput(Output):
    directory = S.THUMBNAILS_DIR
    takes = (S.VIDEO_ROWS, S.CHUNK_ROWS)
    decides_done = False

    def write(self, rows: pa.Table, fs: pafs.FileSystem, root: str, part: str) -> None:
        if S.WIN_THUMBS not in rows.column_names:  # a video's rows
            for vid, jpeg in zip(*(rows.column(c).to_pylist() for c in (S.VIDEO_ID, S.THUMBNAIL)), strict=True):
                if jpeg is not None:
                    st.write_bytes(jpeg, fs, f"{root}/{self.directory}/{st.safe_filename(vid)}.jpg")
            return
        columns = (S.VIDEO_ID, S.WIN_INDEX, S.WIN_THUMBS)
        for vid, index, jpegs in zip(*(rows.column(c).to_pylist() for c in columns), strict=True):
            for k, jpeg in zip(index, jpegs or [], strict=False):
                if jpeg is not None:
                    st.write_bytes(jpeg, fs, f"{root}/{self.directory}/{st.safe_filename(vid)}/{k:05d}.jpg")

    def finalize(self, fs: pafs.FileSystem, root: str, done: pa.Array) -> None:
        """Files named by their video (and window): a rewrite replaced them; nothing to compact."""
