"""Time-localized tagging end to end, as a user runs it: a long video made of clips of three known
classes, an AttentionLSTM fine-tuned on such clips through our own extraction and training, then
``jobs/tag.py --segments`` and ``jobs/report.py``. The spans must sit where each class really is,
within one window, and the video-level tags must equal those of a run without segments."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.browser import Browser, require_cjk_font
from tests.clips import write_clip
from tests.conftest import ROOT, run_job
from tests.ray_nodes import kill_job_midway
from tests.tsn_clips import class_frames, write_class_clips, write_list
from vtplatform import schema as S
from vtplatform.config import load_config
from vtplatform.storage import safe_filename

# The classes' names are the shipped label file's words for the colours, as a user's labels would be:
# 猩红 (scarlet), 绿色 (green), 蓝色 (blue) are classes 44, 632 and 2578 of label_3396.txt.
LABEL_3396 = (ROOT / "configs" / "labels" / "label_3396.txt").read_text(encoding="utf-8").splitlines()
NAMES = [LABEL_3396[i] for i in (44, 632, 2578)]
REPORT_PNG_ENV = "VTP_REPORT_PNG"  # where to keep the report's screenshot (docs/report.png is made so)
SECTION_S = 12  # the long video: 12 s of each class in turn
FPS = 5
WINDOW_S = 4.0
# Copies of the long video after it in the library: work left when the first window rows land. With 3,
# a fresh-clone run saw the kill (0.73 s after they landed) come when all 37 windows were written.
COPIES = 6
# ResNet-18 from seeded random init on 112-pixel crops. Its batch norms hold no statistics, so its
# features come out tens of times larger than a trained TSN's and saturate AttentionLSTM's tanh;
# the network is positively homogeneous, so a 30x image_std brings them to a trained one's scale.
TSN = ["MODEL.num_layers=18", "INFER.seg_num=4", "INFER.short_size=128", "INFER.target_size=112"]
TSN += ["MODEL.image_std=[6.87,6.72,6.75]"]
LSTM = ["MODEL.feature_dims=[512]", "MODEL.embedding_size=256", "MODEL.lstm_size=128", "MODEL.fc1_size=512"]
LSTM += ["MODEL.fc2_size=128", "MODEL.num_classes=3", "MODEL.drop_rate=0.0"]


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """Class clips -> run_extract -> run_train: the weights, and the folder of the files."""
    from vtplatform.extract import run_extract
    from vtplatform.train.lstm import run_train

    root = tmp_path_factory.mktemp("segments")
    clips = write_class_clips(root / "clips", per_class=6, num_frames=12)
    write_list(root / "clips.list", clips)
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    tsn = load_config(ROOT / "configs" / "tsn.yaml", [*TSN, "resources.tsn_threads=1"])
    assert run_extract(tsn, str(root / "clips.list"), str(root / "features")).succeeded == len(clips)
    config = load_config(
        ROOT / "configs" / "attention_lstm.yaml",
        [
            *LSTM,
            f"data.features={root / 'features' / 'features'}",
            f"TRAIN.filelist={root / 'clips.list'}",
            f"VALID.filelist={root / 'clips.list'}",
            "TRAIN.batch_size=1",
            "VALID.batch_size=18",
            "TRAIN.epoch=16",
            "train_run.valid_interval=16",
            "TRAIN.learning_rate=0.0003",
            "TRAIN.decay_epochs=[100]",
            "resources.train_workers=1",
            "resources.train_cpus=0.5",
            "resources.use_gpu=false",
        ],
    )
    summary = run_train(config, str(root / "ckpt"))
    assert summary.best_valid_gap is not None and summary.best_valid_gap > 0.9, summary
    # The long video: sections of red, green, blue, from clips the model has not seen.
    frames = [f for label in range(3) for f in class_frames(label, SECTION_S * FPS, 96, 72, seed=900 + label)]
    write_clip(
        root / "long.mp4", frames, 96, 72, fps=FPS, codec="libx264", options={"preset": "ultrafast", "crf": "18"}
    )
    videos = ["long.mp4", *(f"copy{i}.mp4" for i in range(COPIES))]
    for name in videos[1:]:  # more work after the first window rows land, for the kill to hit
        shutil.copy(root / "long.mp4", root / name)
    (root / "library.list").write_text("".join(f"{root / n}\n" for n in videos) + f"{clips[0][0]}\n")
    return root


def tag_args(root, out, manifest, *extra):
    args = ["--config", "configs/tag.yaml", "--filelist", str(root / manifest), "--save_dir", str(out),
            "--lstm_weights", str(root / "ckpt" / "AttentionLSTM"), "--label_file", str(root / "names.txt"), *extra]  # fmt: skip
    # one video a decode task (TSN and the AttentionLSTM take a row a call): rows reach storage as
    # they are done, so a kill after the first ones lands while others remain
    one = ["resources.decode_batch_size=1"]
    return args + [a for o in [*TSN, *LSTM, "tag.topk=3", *one] for a in ("-o", o)]


def tag(root, out, manifest, *extra):
    res = run_job("tag.py", *tag_args(root, out, manifest, *extra), timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def test_spans_sit_where_each_class_is_and_video_tags_do_not_change(trained, tmp_path):
    """A first run is SIGKILLed (driver and its Ray) a random moment after its first window rows
    land; the rerun must leave each window, timeline frame and span once, and the right ones."""
    out = tmp_path / "out"
    segment_args = ["--segments", str(WINDOW_S), "--thumbnails", "-o", "tag.write_timeline=true"]
    segment_args += ["-o", "tag.timeline_chunk_frames=6", "-o", "output.rows_per_file=1"]  # chunks of 2 windows
    command = [sys.executable, str(ROOT / "jobs" / "tag.py"), *tag_args(trained, out, "library.list", *segment_args)]
    killed = kill_job_midway(command, ROOT, lambda: any((out / S.SEGMENTS_DIR).glob("*.parquet")))
    # what the killed run left (its Ray died with it): some window rows, and no spans (written last)
    left = pq.read_table(out / S.SEGMENTS_DIR, columns=[S.VIDEO_ID, S.WINDOW]).num_rows
    assert left > 0 and not (out / S.SPANS_DIR).exists(), (left, killed.replay)
    printed = tag(trained, out, "library.list", *segment_args)
    assert "0 failed" in printed
    windows = pq.read_table(out / S.SEGMENTS_DIR, columns=[S.VIDEO_ID, S.WINDOW]).num_rows
    assert left < windows, f"the kill came after every window was written: {left} of {windows} ({killed.replay})"
    print(f"at the kill: {left} of {windows} window rows written, no spans", flush=True)
    tags = pq.read_table(out / S.TAGS_DIR)
    assert tags.num_rows == COPIES + 2  # the long video, its copies and one class clip
    long_id = tags.filter(pc.match_substring(tags.column(S.URI), "long.mp4")).column(S.VIDEO_ID)[0].as_py()

    segments = pq.read_table(out / S.SEGMENTS_DIR).filter(pc.field(S.VIDEO_ID) == long_id).sort_by(S.WINDOW)
    k = np.arange(int(3 * SECTION_S / WINDOW_S))
    assert segments.column(S.WINDOW).to_pylist() == k.tolist()  # each window once
    assert segments.column(S.START_S).to_pylist() == (k * WINDOW_S).tolist()
    assert segments.column(S.END_S).to_pylist() == pytest.approx(((k + 1) * WINDOW_S).tolist(), abs=0.21)
    assert max(segments.column(S.CHUNK).to_pylist()) >= 3  # the video went through in several chunks
    truth = [NAMES[int(start // SECTION_S)] for start in k * WINDOW_S]
    assert [names[0] for names in segments.column(S.CLASS_NAMES).to_pylist()] == truth

    spans = pq.read_table(out / S.SPANS_DIR).filter(pc.field(S.VIDEO_ID) == long_id).to_pylist()
    for c, name in enumerate(NAMES):
        mine = [s for s in spans if s[S.NAME] == name]
        assert len(mine) == 1, spans
        assert abs(mine[0][S.START_S] - c * SECTION_S) <= WINDOW_S, mine
        assert abs(mine[0][S.END_S] - (c + 1) * SECTION_S) <= WINDOW_S, mine
        assert 0.5 <= mine[0][S.MEAN_PROB] <= mine[0][S.MAX_PROB] <= 1.0
    assert pq.read_table(out / S.SPANS_DIR).group_by([S.VIDEO_ID, S.CLASS_ID, S.START_S]).aggregate(
        [(S.END_S, "count")]
    ).column(f"{S.END_S}_count").to_pylist() == [1] * len(pq.read_table(out / S.SPANS_DIR))

    timeline = pq.read_table(out / S.TIMELINE_DIR).filter(pc.field(S.VIDEO_ID) == long_id)
    assert sorted(timeline.column(S.T_SECONDS).to_pylist()) == [float(t) for t in range(3 * SECTION_S)]
    made = S.read_provenance(pq.read_schema(next((out / S.TIMELINE_DIR).glob("*.parquet"))))
    assert made["timeline"] == {
        "seconds": WINDOW_S, "stride_seconds": WINDOW_S, "timeline_fps": 1.0, "timeline_chunk_frames": 6
    }  # fmt: skip
    assert made["model"]["depth"] == 18 and made["preprocessing"]["target_size"] == 112

    thumbs = out / S.THUMBNAILS_DIR
    assert (thumbs / f"{safe_filename(long_id)}.jpg").stat().st_size > 0
    assert sorted(p.name for p in (thumbs / safe_filename(long_id)).iterdir()) == [f"{i:05d}.jpg" for i in k]

    plain = tmp_path / "plain"
    tag(trained, plain, "library.list")
    assert not (plain / S.SEGMENTS_DIR).exists()
    with_segments, without = (pq.read_table(d / S.TAGS_DIR).sort_by(S.VIDEO_ID) for d in (out, plain))
    assert with_segments.to_pylist() == without.to_pylist()

    res = run_job("report.py", "--tags", str(out), "--save_dir", str(tmp_path / "report"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    report = tmp_path / "report"
    assert (report / "index.html").exists()
    assert (report / S.THUMBNAILS_DIR / safe_filename(long_id) / f"{k[-1]:05d}.jpg").exists()
    require_cjk_font()
    with Browser(tmp_path / "chromium-profile", width=1100, height=900) as b:
        b.open((report / "index.html").as_uri())
        card = f'[data-video-id="{long_id}"]'
        rows = b.eval(
            f"[...document.querySelectorAll({json.dumps(card + ' [data-testid=span-row]')})].map((e) => e.dataset.name)"
        )
        assert sorted(rows) == sorted(NAMES), rows
        fonts = b.fonts(f'{card} [data-testid="span-row"] .rname')  # drawn as characters, not boxes
        assert sum(n for family, n in fonts.items() if "CJK" in family) == 2, fonts
        b.wait_until("[...document.images].every((i) => i.complete && i.naturalWidth > 0)")
        png = b.screenshot()
    (tmp_path / "report.png").write_bytes(png)
    if os.environ.get(REPORT_PNG_ENV):
        Path(os.environ[REPORT_PNG_ENV]).write_bytes(png)
