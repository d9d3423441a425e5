"""Evaluating an AttentionLSTM checkpoint: YouTube-8M metrics over TEST.filelist (or a labels
file joined to the feature table), logged in the seed's format and written as a JSON report."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config
from vtplatform.eval.youtube8m import Youtube8mMetrics, seed_log_line
from vtplatform.lstm_data import read_inputs
from vtplatform.predict import inference_dataset

log = logging.getLogger(__name__)


def run_eval(config: Config, weights: str, save_dir: str, filelist: str | None = None) -> dict[str, Any]:
    """Metrics of ``weights`` on the labelled videos; writes ``save_dir/report.json``."""
    start = time.perf_counter()
    inputs = read_inputs(config, "test", filelist or config.test.filelist)
    model_config, loaded, ds = inference_dataset(
        config, weights, inputs, config.test.use_gpu, None, config.test.batch_size, with_targets=True
    )
    metrics = Youtube8mMetrics(model_config.num_classes, config.model.topk)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        metrics.accumulate(batch[S.PROBS], batch[S.TARGETS], batch[S.LOSS])
        log.info("evaluated %d videos", len(metrics))
    result = metrics.result()
    log.info("%s", seed_log_line(result))
    report = {
        "weights": st.redact(loaded.source),
        "inputs": st.redact(inputs.source),
        "skipped": dict(inputs.skipped),
        "label_fingerprint": (loaded.meta or {}).get("label_fingerprint"),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_seconds": round(time.perf_counter() - start, 3),
        **result,
    }
    fs, root = st.filesystem(save_dir, config.storage)
    st.write_bytes(json.dumps(report, indent=1, ensure_ascii=False).encode("utf-8"), fs, f"{root}/{S.REPORT_FILE}")
    return report


def format_report(report: dict[str, Any], save_dir: str) -> str:
    return "\n".join(
        [
            "evaluation summary",
            f"  weights   {report['weights']}",
            f"  videos    {report['num_videos']}" + (f" (skipped {report['skipped']})" if report["skipped"] else ""),
            f"  GAP@{report['top_k']:<5} {report['gap']:.4f}",
            f"  Hit@1     {report['hit_at_one']:.4f}",
            f"  PERR      {report['perr']:.4f}",
            f"  mAP       {report['map']:.4f} over {report['num_classes_with_positives']} classes with positives"
            f" (eval_util: top-{report['top_k']} pairs; {report['map_full_ranking']:.4f} over all videos' ranking)",
            f"  avg loss  {report['avg_loss']:.4f}",
            f"  report    {save_dir.rstrip('/')}/{S.REPORT_FILE}",
        ]
    )
