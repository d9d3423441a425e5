"""TSN evaluation: TOP1/TOP5, per-class accuracy and confusions on the TEST list, through the
classifier pipeline ``stages.classifier.classify`` (prediction, its twin, is in ``predict``).

Videos that cannot be loaded are counted, logged and written as dead letters under
``save_dir``; they never stop the job.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError
from vtplatform.eval import classification as C
from vtplatform.labels import label_names_for
from vtplatform.stages.classifier import classify, collect

log = logging.getLogger(__name__)


def run_eval(
    config: Config,
    weights: str,
    save_dir: str | None = None,
    filelist: str | None = None,
    label_file: str | None = None,
) -> dict[str, Any]:
    """TOP1/TOP5, per-class accuracy and confusions on the TEST list (``TEST.seg_num`` centred
    segments); writes ``report.json`` under ``save_dir`` when given. Returns the report."""
    results = collect(classify(config, "test", weights, filelist, labelled=True))
    if not results.table.num_rows:
        raise ConfigError(f"no video of the test list could be loaded ({results.failure_counts()})")
    report = C.evaluate(
        np.array(results.table.column(S.CLASS_IDS).to_pylist(), np.int64),
        np.array(results.table.column(S.LABEL).to_pylist(), np.int64),
        config.model.num_classes,
        label_probs=np.array(results.table.column(S.LABEL_PROB).to_pylist(), np.float64),
        class_names=label_names_for(label_file, config.model.num_classes, config.storage),
    )
    report |= {
        "model": "TSN",
        "weights": st.redact(weights),
        "segments": config.test.seg_num,
        "failed": results.failure_counts(),
        "elapsed_seconds": results.elapsed_seconds,
    }
    log.info("%s", C.format_report(report))
    if save_dir:
        C.write_json(report, save_dir.rstrip("/") + "/" + S.REPORT_FILE, config.storage)
        results.write_dead_letters(save_dir, config.storage)
    return report
