"""Fine-tune a VideoTag model on Ray Train; checkpoints go to SAVE_DIR/RUN_NAME (local or s3://).

    python jobs/train.py --model_name=AttentionLSTM --config=configs/attention_lstm.yaml \
        --pretrain=WEIGHTS --save_dir=DIR_OR_S3 [-o SECTION.key=value ...]
    ray job submit --working-dir . -- python jobs/train.py ...

Rerunning with the same --save_dir and run name resumes from the last checkpoint.
Exit codes: 0 done, 1 training failed, 2 bad configuration or input data.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from vtplatform import cli


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--model_name", default=None, help="AttentionLSTM or TSN (default: MODEL.name)")
    p.add_argument(
        "--pretrain", default=None, help="weights to start from: an official VideoTag file, or one of our checkpoints"
    )
    p.add_argument("--save_dir", default="data/checkpoints", help="folder or s3:// prefix for the run's checkpoints")
    p.add_argument(
        "--run_name",
        default=None,
        help="the run's folder under --save_dir (default: train_run.run_name or the model name)",
    )
    p.add_argument(
        "--label_file",
        default=None,
        help="class names (line i = class i), recorded as the label set of the checkpoints",
    )
    p.add_argument("--features", default=None, help="feature table from jobs/extract.py (sets data.features)")
    args = p.parse_args()
    cli.setup_logging(args.log_level)

    from vtplatform import catalog
    from vtplatform.config import load_config

    config = load_config(
        args.config, cli.overrides(args, {"run_name": "train_run.run_name", "features": "data.features"})
    )
    model = catalog.pick(args.model_name, config)
    cli.init_ray()
    summary = model.train(config, args.save_dir, pretrain=args.pretrain, label_file=args.label_file)
    print(summary.format(), flush=True)
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
