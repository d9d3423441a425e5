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


def attention_lstm(config, args) -> int:
    from vtplatform.eval.lstm import format_report, run_eval

    report = run_eval(config, args.weights, args.save_dir)
    print(format_report(report, args.save_dir), flush=True)
    return cli.EXIT_OK


def tsn(config, args) -> int:
    from vtplatform.eval.classification import format_report
    from vtplatform.eval.tsn import run_eval

    report = run_eval(config, args.weights, args.save_dir)
    print(format_report(report), flush=True)
    return cli.EXIT_OK


EVALUATORS = {"AttentionLSTM": attention_lstm, "TSN": tsn}


def pick(name: str | None, config):
    """The entry for --model_name (default MODEL.name), matched case-insensitively like the seed."""
    from vtplatform.config import ConfigError

    name = name or config.model.name
    found = {k.lower(): k for k in EVALUATORS}.get(name.lower())
    if found is None:
        raise ConfigError(f"--model_name {name!r} is not one of {sorted(EVALUATORS)}")
    if found.lower() != config.model.name.lower():
        raise ConfigError(f"--model_name {name} but the config's MODEL.name is {config.model.name}")
    return EVALUATORS[found]


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--model_name", default=None, help=f"one of {sorted(EVALUATORS)} (default: MODEL.name)")
    p.add_argument("--weights", required=True, help="checkpoint folder, run folder or weight file (local or s3://)")
    p.add_argument(
        "--save_dir", default=None, help="folder or s3:// prefix for report.json (default: data/eval_results/MODEL)"
    )
    p.add_argument("--filelist", default=None, help="labelled videos (default: TEST.filelist)")
    p.add_argument("--features", default=None, help="feature table from jobs/extract.py (sets data.features)")
    args = p.parse_args()
    cli.setup_logging(args.log_level)

    from vtplatform.config import load_config

    config = load_config(args.config, cli.overrides(args, {"filelist": "TEST.filelist", "features": "data.features"}))
    evaluate = pick(args.model_name, config)
    args.save_dir = args.save_dir or f"data/eval_results/{config.model.name.lower()}"
    cli.init_ray()
    return evaluate(config, args)


if __name__ == "__main__":
    cli.run(main)
