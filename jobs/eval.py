"""Evaluate a checkpoint: GAP, Hit@1, PERR, mAP and per-class AP (AttentionLSTM), as a JSON report.

    python jobs/eval.py --model_name=AttentionLSTM --config=configs/attention_lstm.yaml --weights=CKPT \
        [--save_dir=OUT] [-o ...]

--weights: a checkpoint folder, a run folder (its best/), or a weight file; local or s3://.
Exit codes: 0 done, 2 bad configuration or input data.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from vtplatform import cli


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--model_name", default=None, help="AttentionLSTM or TSN (default: MODEL.name)")
    p.add_argument("--weights", required=True, help="checkpoint folder, run folder or weight file (local or s3://)")
    p.add_argument(
        "--save_dir", default=None, help="folder or s3:// prefix for report.json (default: data/eval_results/MODEL)"
    )
    p.add_argument("--filelist", default=None, help="labelled videos (default: TEST.filelist)")
    p.add_argument("--features", default=None, help="feature table from jobs/extract.py (sets data.features)")
    args = p.parse_args()
    cli.setup_logging(args.log_level)

    from vtplatform import catalog
    from vtplatform.config import load_config

    config = load_config(args.config, cli.overrides(args, {"filelist": "TEST.filelist", "features": "data.features"}))
    model = catalog.pick(args.model_name, config)
    save_dir = args.save_dir or f"data/eval_results/{config.model.name.lower()}"
    cli.init_ray()
    report = model.evaluate(config, args.weights, save_dir, label_file=None)
    print(model.format_report(report, save_dir), flush=True)
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
