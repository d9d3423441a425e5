"""The per-video runner's own parts, without Ray: input blocks, the crash ledger's attribution,
finalizing and planning on arrays, and decode blocks of bounded size."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import EXAMPLES, ROOT
from vtplatform import schema as S
from vtplatform.config import StorageSection, load_config
from vtplatform.manifest import Manifest
from vtplatform.outputs import Output, done_videos
from vtplatform.outputs.dead_letters import dead_letter_table, dead_video_ids
from vtplatform.pipeline import (
    ABSENT,
    ABSENT_PER_TASK,
    JobSummary,
    finalize_outputs,
    input_blocks,
    todo_entries,
    with_local_sizes,
)
from vtplatform.stages.decode import (
    CRASHES_BEFORE_DEAD_LETTER,
    FRAMES_PER_BLOCK,
    DecodeLedger,
    decode_options,
    decode_videos,
)


def _manifest(n: int, sizes: list[int | None] | None = None) -> pa.Table:
    return pa.table(
        {
            S.VIDEO_ID: [f"v{i}" for i in range(n)],
            S.URI: [f"/lib/v{i}.mp4" for i in range(n)],
            S.LABELS: [[] for _ in range(n)],
            S.SIZE_BYTES: sizes if sizes is not None else [None] * n,
        },
        schema=S.MANIFEST_SCHEMA,
    )


def test_input_blocks_give_long_videos_tasks_of_their_own():
    mb = 1 << 20
    sizes = [10 * mb] * 5 + [900 * mb] + [10 * mb] * 3 + [600 * mb, 600 * mb]
    blocks = input_blocks(_manifest(len(sizes), sizes), videos_per_task=4, bytes_per_task=512 * mb)
    assert [b.num_rows for b in blocks] == [4, 1, 1, 3, 1, 1]  # 900 MB and each 600 MB alone
    assert pa.concat_tables(blocks).column(S.VIDEO_ID).to_pylist() == [f"v{i}" for i in range(len(sizes))]
    unknown = input_blocks(_manifest(10), videos_per_task=4, bytes_per_task=512 * mb)
    assert [b.num_rows for b in unknown] == [4, 4, 2]  # no sizes: by count
    assert len(input_blocks(_manifest(10_000), videos_per_task=1, max_blocks=100)) == 100
    gone = input_blocks(_manifest(5000, [ABSENT if i % 2 else mb for i in range(5000)]), 4, 512 * mb)
    # files that are not there: in bulk
    assert [b.num_rows for b in gone] == [4] * 625 + [ABSENT_PER_TASK, 2500 - ABSENT_PER_TASK]
    assert sorted(pa.concat_tables(gone).column(S.VIDEO_ID).to_pylist()) == sorted(f"v{i}" for i in range(5000))


def test_local_sizes_come_from_the_disk(tmp_path):
    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"x" * 1234)
    table = _manifest(2).set_column(1, S.URI, pa.array([str(clip), str(tmp_path / "missing.mp4")]))
    assert with_local_sizes(table).column(S.SIZE_BYTES).to_pylist() == [1234, ABSENT]


def test_the_ledger_charges_a_death_to_the_video_that_was_being_decoded():
    ledger = DecodeLedger()
    ids = ["a", "b", "c"]
    assert ledger.begin("block", ids) == (0, {})  # first attempt: decoded without per-video calls
    # ... it died somewhere: the retry is careful and records each start
    assert ledger.begin("block", ids) == (1, {})
    ledger.start("a")
    ledger.finish("a")
    ledger.start("b")  # and died here
    attempt, deaths = ledger.begin("block", ids)
    assert attempt == 2 and deaths == {"b": (1, 0)}
    ledger.start("b")  # died again
    assert ledger.begin("block", ids)[1] == {"b": (CRASHES_BEFORE_DEAD_LETTER, 0)}
    # a hang the watchdog caught names its video, careful or not, and is counted once
    ledger.timed_out("c")
    ledger.start("c")
    ledger.timed_out("c")
    assert ledger.begin("block", ids)[1]["c"] == (2, 2)


def test_a_decode_task_yields_bounded_blocks_and_fails_unreadable_files_fast(tmp_path):
    """300 crops per video: a block never holds more than FRAMES_PER_BLOCK (512) crops unless one
    row alone does, so a task (and a TSN actor, which takes a block at a time) holds about one
    block whatever the number and length of its videos. A failed row holds none."""
    config = load_config(ROOT / "configs" / "tsn.yaml", ["INFER.seg_num=300"])
    clip = str(EXAMPLES / "mmaction2_test.mp4")
    batch = pa.table({S.VIDEO_ID: ["x", "missing", "y", "z"], S.URI: [clip, str(tmp_path / "no.mp4"), clip, clip]})
    blocks = list(decode_videos(batch, decode_options(config), StorageSection()))
    assert FRAMES_PER_BLOCK == 512 and [b.column(S.VIDEO_ID).to_pylist() for b in blocks] == [
        ["x", "missing"],
        ["y"],
        ["z"],
    ]
    one_frame = decode_options(load_config(ROOT / "configs" / "tsn.yaml", ["INFER.seg_num=200"]))
    small = list(decode_videos(batch.slice(2), one_frame, StorageSection()))
    assert [b.column(S.VIDEO_ID).to_pylist() for b in small] == [["y", "z"]]  # 400 crops: one block
    rows = pa.concat_tables(blocks).to_pylist()
    assert (rows[1][S.STAGE], rows[1][S.ERROR_TYPE], rows[1][S.FRAMES]) == ("read", "FileNotFoundError", None)
    assert len(rows[0][S.FRAMES]) == 300 * 224 * 224 * 3 and rows[0][S.FRAMES] == rows[2][S.FRAMES]


def test_planning_and_finalizing_work_on_arrays(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    (tmp_path / "features").mkdir()
    pq.write_table(pa.table({S.VIDEO_ID: ["v0", "v1"]}), tmp_path / "features" / "part-a.parquet")
    dead = dead_letter_table([{S.VIDEO_ID: "v2", S.URI: "u", S.STAGE: "read", S.ERROR_TYPE: "X", S.MESSAGE: "m"}])
    (tmp_path / "dead_letters").mkdir()
    pq.write_table(dead, tmp_path / "dead_letters" / "part-b.parquet")

    class Features(Output):
        directory = "features"

    done, dead = done_videos([Features()], fs, root), dead_video_ids(fs, root)
    assert isinstance(done, pa.Array) and sorted(done.to_pylist()) == ["v0", "v1"] and dead.to_pylist() == ["v2"]
    summary = JobSummary("x", root, ["features"])
    todo = todo_entries(Manifest(_manifest(5)), done, dead, False, fs, root, summary)
    assert todo.column(S.VIDEO_ID).to_pylist() == ["v3", "v4"] and summary.skipped == 3
    again = todo_entries(Manifest(_manifest(5)), done, dead, True, fs, root, JobSummary("x", root, ["features"]))
    assert again.column(S.VIDEO_ID).to_pylist() == ["v2", "v3", "v4"]  # --retry_failed
    with pytest.raises(RuntimeError, match="1 submitted videos reached neither features nor dead letters"):
        finalize_outputs([Features()], fs, root, expected=pa.array(["v0", "v2", "v3"]))
