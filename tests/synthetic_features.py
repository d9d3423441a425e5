"""Small, learnable feature sets for AttentionLSTM tests, written through the project's schema.

Each video gets 1-3 labels; its features are noise plus a fixed pattern per label on a few
segments, so a model can learn the labels in a few epochs.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from vtplatform import schema as S
from vtplatform import storage as st


def provenance(feature_dim: int, depth: int = 18, weights: str = "synthetic-weights") -> dict:
    return {
        "schema_version": S.SCHEMA_VERSION,
        "vtplatform_version": "test",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": "TSN", "depth": depth, "feature_dim": feature_dim},
        "weights": weights,
        "sampling": {"rule": "videotag-infer", "num_segments": 0, "seglen": 1},
        "feature_dtype": "float16",
    }


def make_videos(
    n: int, num_segments: int, feature_dim: int, num_classes: int, seed: int = 0
) -> tuple[list[str], np.ndarray, list[list[int]]]:
    rng = np.random.default_rng(seed)
    patterns = rng.normal(0.0, 1.0, (num_classes, feature_dim))
    ids, feats, labels = [], [], []
    for i in range(n):
        k = int(rng.integers(1, 4))
        labs = sorted(rng.choice(num_classes, size=min(k, num_classes), replace=False).tolist())
        x = np.abs(rng.normal(0.0, 0.5, (num_segments, feature_dim)))
        for lab in labs:
            steps = rng.choice(num_segments, size=max(1, num_segments // 3), replace=False)
            x[steps] += np.abs(patterns[lab])
        ids.append(f"vid{i:04d}")
        feats.append(x)
        labels.append(labs)
    return ids, np.stack(feats).astype(np.float32), labels


def write_feature_table(
    directory: Path,
    ids: list[str],
    feats: np.ndarray,
    rows_per_file: int = 8,
    dtype: str = "float16",
    prov: dict | None = None,
    uris: list[str] | None = None,
) -> Path:
    """``directory/features/part-NNNNN.parquet`` in the feature-table schema; returns the folder."""
    out = Path(directory) / "features"
    out.mkdir(parents=True, exist_ok=True)
    n, seg, dim = feats.shape
    schema = S.feature_schema(seg, dim, dtype, prov or provenance(dim))
    uris = uris or [f"/videos/{v}.mp4" for v in ids]
    for part, start in enumerate(range(0, n, rows_per_file)):
        sl = slice(start, start + rows_per_file)
        m = len(ids[sl])
        table = pa.table(
            {
                S.VIDEO_ID: ids[sl],
                S.URI: uris[sl],
                S.FEATURES: S.features_array(feats[sl], dtype),
                S.NUM_FRAMES: pa.array([300] * m, pa.int32()),
                S.FRAME_INDICES: pa.FixedSizeListArray.from_arrays(
                    pa.array(np.tile(np.arange(seg), m), pa.int32()), seg
                ),
                S.FPS: pa.array([25.0] * m, pa.float32()),
                S.WIDTH: pa.array([320] * m, pa.int32()),
                S.HEIGHT: pa.array([240] * m, pa.int32()),
                S.DECODER: ["synthetic"] * m,
            },
            schema=schema,
        )
        st.write_parquet(table, pafs.LocalFileSystem(), str(out / f"part-{part:05d}.parquet"))  # as extraction writes
    return out


def write_npy_files(directory: Path, ids: list[str], feats: np.ndarray, lengths: list[int] | None = None) -> list[Path]:
    """The seed's layout: one ``<video_id>.npy`` [T, D] float32 file per video."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (vid, x) in enumerate(zip(ids, feats, strict=True)):
        path = directory / f"{vid}.npy"
        np.save(path, x[: lengths[i]] if lengths else x)
        paths.append(path)
    return paths


def write_list(path: Path, items: list[str], labels: list[list[int]] | None, trailing_space: bool = True) -> Path:
    """A seed list file: ``item l1 l2``; every other line ends with a space, as the seed's do."""
    lines = []
    for i, item in enumerate(items):
        labs = " ".join(str(x) for x in labels[i]) if labels is not None else ""
        line = f"{item} {labs}".rstrip()
        lines.append(line + (" " if trailing_space and i % 2 == 0 else ""))
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)
