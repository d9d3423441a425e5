"""The AttentionLSTM's inputs: seed list files as they are, feature tables joined to labels, bad
rows as clear errors or counted skips, and the rows the datasets actually deliver."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import SEED
from tests.synthetic_features import make_videos, provenance, write_feature_table, write_list, write_npy_files
from vtplatform import lstm_data as D
from vtplatform import schema as S
from vtplatform.config import ConfigError, StorageSection, load_config

DIM, SEG, CLASSES = 6, 5, 4


def config(*overrides: str):
    return load_config(
        SEED / "configs" / "attention_lstm.yaml",
        [f"MODEL.num_classes={CLASSES}", f"MODEL.feature_dims=[{DIM}]", *overrides],
    )


def rows_of(ds) -> dict[str, tuple[np.ndarray, int, np.ndarray]]:
    out = {}
    for batch in ds.iter_batches(batch_size=3, batch_format="numpy"):
        x, lengths, targets = D.collate(batch)
        for i, vid in enumerate(batch[S.VIDEO_ID]):
            out[str(vid)] = (x[i, : lengths[i]], int(lengths[i]), targets[i])
    return out


def test_seed_list_files_as_they_are():
    labels, problems = D.read_labels(
        str(SEED / "lists" / "dataset__attention_lstm__train.list.example"), StorageSection()
    )
    assert problems == []
    assert labels.column(S.VIDEO_ID).to_pylist() == ["1", "2", "3", "4", "5"]  # data/tsn_features/1.npy -> "1"
    assert labels.column(S.LABELS).to_pylist() == [[0, 3, 4], [1], [2], [3, 4], [4]]  # trailing spaces are fine
    assert labels.column(S.URI)[0].as_py().endswith("data/tsn_features/1.npy")
    infer, _ = D.read_labels(str(SEED / "lists" / "dataset__attention_lstm__infer.list.example"), StorageSection())
    assert infer.column(S.LABELS).to_pylist() == [[]] * 5


def test_seed_npy_layout_with_every_kind_of_bad_row(ray_cluster, tmp_path):
    ids, feats, labels = make_videos(6, SEG, DIM, CLASSES, seed=1)
    lengths = [5, 1, 3, 5, 2, 4]
    paths = write_npy_files(tmp_path / "npy", ids, feats, lengths)
    np.save(tmp_path / "npy" / "wrongdim.npy", np.zeros((4, DIM + 1), np.float32))
    np.save(tmp_path / "npy" / "empty.npy", np.zeros((0, DIM), np.float32))
    (tmp_path / "npy" / "garbage.npy").write_bytes(b"not numpy")
    items = [str(p) for p in paths] + [
        str(tmp_path / "npy" / n) for n in ("missing.npy", "wrongdim.npy", "empty.npy", "garbage.npy")
    ]
    all_labels = [*labels, [0], [1], [2], [3]]
    all_labels[2] = [1, CLASSES]  # a label >= num_classes
    filelist = write_list(tmp_path / "train.list", items, all_labels)

    with pytest.raises(D.DataError) as err:
        D.read_inputs(config(), "train", str(filelist))
    message = str(err.value)
    assert "missing.npy: file not found" in message and "on_bad_row=skip" in message

    inputs = D.read_inputs(config("data.on_bad_row=skip"), "train", str(filelist))
    assert inputs.skipped == {D.MISSING_FEATURES: 1, D.BAD_SHAPE: 2, D.UNREADABLE: 1, D.LABEL_OUT_OF_RANGE: 1}
    assert len(inputs) == 5 and ids[2] not in inputs.rows.column(S.VIDEO_ID).to_pylist()
    got = rows_of(D.make_dataset(inputs, config()))
    assert set(got) == set(ids) - {ids[2]}
    for i, vid in enumerate(ids):
        if vid == ids[2]:
            continue
        x, length, targets = got[vid]
        assert length == lengths[i]
        np.testing.assert_array_equal(x, feats[i, : lengths[i]])
        np.testing.assert_array_equal(np.nonzero(targets)[0], labels[i])


def test_a_malformed_list_line_is_a_bad_row(ray_cluster, tmp_path):
    ids, feats, _ = make_videos(3, SEG, DIM, CLASSES)
    paths = write_npy_files(tmp_path, ids, feats)
    text = f"{paths[0]} 1 2\n{paths[1]}\x00 1\n{paths[2]} 3\n"
    (tmp_path / "l.list").write_text(text)
    with pytest.raises(D.DataError, match="line 2: line contains a NUL byte"):
        D.read_inputs(config(), "train", str(tmp_path / "l.list"))
    inputs = D.read_inputs(config("data.on_bad_row=skip"), "train", str(tmp_path / "l.list"))
    assert inputs.skipped == {D.BAD_LINE: 1} and len(inputs) == 2


def test_list_names_with_spaces_tabs_and_unicode(ray_cluster, tmp_path):
    """Trailing integers are the labels; the rest of the line, spaces and tabs included, is the
    path. A word that is not an integer belongs to the path, so it names a missing file."""
    _, feats, _ = make_videos(3, SEG, DIM, CLASSES, seed=3)
    names = ["видео 测试 clip", "a  b", "tab\tname"]
    paths = write_npy_files(tmp_path / "npy dir", names, feats)
    text = f"{paths[0]} 1 3\n{paths[1]}\t2\n{paths[2]}   0  \n{paths[0]} one\n"
    (tmp_path / "l.list").write_text(text, encoding="utf-8")
    labels, problems = D.read_labels(str(tmp_path / "l.list"), StorageSection())
    assert problems == []
    assert labels.column(S.VIDEO_ID).to_pylist()[:3] == names  # an .npy names its video by the file stem
    assert labels.column(S.URI).to_pylist() == [*map(str, paths), f"{paths[0]} one"]
    assert labels.column(S.LABELS).to_pylist() == [[1, 3], [2], [0], []]
    inputs = D.read_inputs(config("data.on_bad_row=skip"), "train", str(tmp_path / "l.list"))
    assert inputs.skipped == {D.MISSING_FEATURES: 1} and len(inputs) == 3
    got = rows_of(D.make_dataset(inputs, config()))
    for i, name in enumerate(names):
        np.testing.assert_array_equal(got[name][0], feats[i])


@pytest.fixture
def table(tmp_path):
    ids, feats, labels = make_videos(11, SEG, DIM, CLASSES, seed=2)
    uris = [f"/videos/{v}.mp4" for v in ids]
    write_feature_table(tmp_path, ids, feats, rows_per_file=4, uris=uris)
    return tmp_path / "features", ids, feats, labels, uris


def test_table_joined_to_a_seed_list_of_npy_names(ray_cluster, tmp_path, table):
    root, ids, feats, labels, _ = table
    filelist = write_list(tmp_path / "train.list", [f"out/npy/{v}.npy" for v in ids[:8]], labels[:8])
    inputs = D.read_inputs(config(f"data.features={root}"), "train", str(filelist))
    assert len(inputs) == 8 and inputs.unlabelled == 3 and inputs.feature_dim == DIM and inputs.num_segments == SEG
    assert inputs.provenance["model"]["depth"] == 18
    got = rows_of(D.make_dataset(inputs, config(f"data.features={root}")))
    assert set(got) == set(ids[:8])
    for i in range(8):
        x, length, targets = got[ids[i]]
        np.testing.assert_array_equal(x, feats[i].astype(np.float16).astype(np.float32))  # stored as float16
        assert length == SEG and np.nonzero(targets)[0].tolist() == labels[i]


def test_table_joined_to_labels_tables_by_video_id_or_uri(ray_cluster, tmp_path, table):
    root, ids, _, labels, uris = table
    by_id = pa.table({S.VIDEO_ID: ids[:3], S.LABELS: pa.array(labels[:3], pa.list_(pa.int32()))})
    pq.write_table(by_id, tmp_path / "labels.parquet")
    inputs = D.read_inputs(config(f"data.features={root}"), "valid", str(tmp_path / "labels.parquet"))
    assert inputs.rows.column(S.LABELS).to_pylist() == labels[:3]
    csv = pa.table(
        {S.URI: [*uris[3:6], "/videos/unknown.mp4"], S.LABELS: [*(" ".join(map(str, x)) for x in labels[3:6]), "1"]}
    )
    pacsv.write_csv(csv, tmp_path / "labels.csv")
    with pytest.raises(D.DataError, match=r"unknown\.mp4: not in the feature table"):
        D.read_inputs(config(f"data.features={root}"), "valid", str(tmp_path / "labels.csv"))
    inputs = D.read_inputs(
        config(f"data.features={root}", "data.on_bad_row=skip"), "valid", str(tmp_path / "labels.csv")
    )
    assert inputs.rows.column(S.VIDEO_ID).to_pylist() == ids[3:6] and inputs.skipped == {D.MISSING_FEATURES: 1}


def test_table_provenance_is_checked(tmp_path):
    ids, feats, _ = make_videos(4, SEG, DIM, CLASSES)
    write_feature_table(tmp_path / "a", ids[:2], feats[:2], prov=provenance(DIM, weights="w1"))
    write_feature_table(tmp_path / "b", ids[2:], feats[2:], prov=provenance(DIM, weights="w2"))
    (tmp_path / "a" / "features" / "part-00000.parquet").rename(tmp_path / "b" / "features" / "part-x.parquet")
    with pytest.raises(ConfigError, match=r"made differently.*weights"):
        D.open_feature_table(str(tmp_path / "b" / "features"), StorageSection())
    old = provenance(DIM)
    old["schema_version"] = 0
    write_feature_table(tmp_path / "c", ids, feats, prov=old)
    with pytest.raises(ConfigError, match="schema version 0"):
        D.open_feature_table(str(tmp_path / "c" / "features"), StorageSection())
    with pytest.raises(ConfigError, match="no feature table"):
        D.open_feature_table(str(tmp_path / "nothing"), StorageSection())


def test_prediction_inputs_are_the_whole_table_without_labels(ray_cluster, table):
    root, ids, _, _, uris = table
    inputs = D.read_inputs(config(f"data.features={root}"), "infer", None, need_labels=False)
    assert inputs.rows.column(S.VIDEO_ID).to_pylist() == ids and inputs.rows.column(S.URI).to_pylist() == uris
    with pytest.raises(ConfigError, match=r"TRAIN\.filelist must name the labels"):
        D.read_inputs(config(f"data.features={root}"), "train", None)


def test_large_row_groups_stream_in_slices(ray_cluster, tmp_path):
    """A table is read a row group at a time in slices of READ_ROWS rows, never a file at once."""
    n = 3 * D.READ_ROWS + 5
    ids, feats, labels = make_videos(n, 2, DIM, CLASSES, seed=3)
    write_feature_table(tmp_path, ids, feats, rows_per_file=n)  # one file, one row group
    filelist = write_list(tmp_path / "l.list", [f"{v}.npy" for v in ids], labels)
    cfg = config(f"data.features={tmp_path / 'features'}")
    inputs = D.read_inputs(cfg, "train", str(filelist))
    assert inputs.table_units == [(str(tmp_path / "features" / "part-00000.parquet"), 0)]
    unit = pa.table({S.PATH: [inputs.table_units[0][0]], "row_group": [0]})
    index = {
        "ids": inputs.rows.column(S.VIDEO_ID).combine_chunks(),
        "labels": inputs.rows.column(S.LABELS).combine_chunks(),
    }
    slices = list(D._table_rows(unit, str(tmp_path / "features"), StorageSection(), index, CLASSES, True))
    assert [len(s[S.VIDEO_ID]) for s in slices] == [D.READ_ROWS] * 3 + [5]
    assert D.make_dataset(inputs, cfg).count() == n
    assert inputs.nbytes == n * 2 * DIM * 2  # float16 in the table


def test_collate_pads_ragged_rows():
    rows = np.empty(2, dtype=object)
    rows[:] = [np.ones((3, 2), np.float32), 2 * np.ones((1, 2), np.float32)]
    x, lengths, targets = D.collate(
        {S.FEATURES: rows, S.LENGTH: np.array([3, 1]), S.TARGETS: np.eye(2, dtype=np.uint8)}
    )
    assert x.shape == (2, 3, 2) and lengths.tolist() == [3, 1] and targets.dtype == np.float32
    np.testing.assert_array_equal(x[1], [[2, 2], [0, 0], [0, 0]])
