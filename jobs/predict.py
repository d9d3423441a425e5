"""Top-k tags per video: a predictions table (plus the seed's per-video JSON with --seed_json).

    python jobs/predict.py --model_name=AttentionLSTM --config=configs/attention_lstm.yaml --weights=CKPT \
        --label_file=configs/labels/label_3396.txt --save_dir=OUT [--seed_json] [-o ...]

Inputs: --filelist (default INFER.filelist), or with --features and no list, every row of the table.
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
        "--label_file", default=None, help="class names, line i = class i (e.g. configs/labels/label_3396.txt)"
    )
    p.add_argument("--save_dir", default="data/predict_results/attention_lstm", help="folder or s3:// prefix")
    p.add_argument(
        "--filelist", default=None, help="videos to tag (default: INFER.filelist, or the whole --features table)"
    )
    p.add_argument("--features", default=None, help="feature table from jobs/extract.py (sets data.features)")
    p.add_argument("--infer_topk", type=int, default=None, help="tags per video (default: MODEL.topk)")
    p.add_argument("--seed_json", action="store_true", help="also write the seed's json/result<i>.json per video")
    args = p.parse_args()
    cli.setup_logging(args.log_level)

    from vtplatform import catalog
    from vtplatform.config import load_config

    flags = {"filelist": "INFER.filelist", "features": "data.features", "infer_topk": "MODEL.topk"}
    config = load_config(args.config, cli.overrides(args, flags))
    model = catalog.pick(args.model_name, config)
    cli.init_ray()
    whole_table = bool(args.features and not args.filelist)  # a feature table and no list: all its rows
    summary = model.predict(config, args.weights, args.save_dir, args.label_file, args.seed_json, whole_table)
    print(summary.format(), flush=True)
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
