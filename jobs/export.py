"""Export TSN and/or AttentionLSTM as Paddle Inference models (paddle.jit.save) for serving.

    python jobs/export.py --config configs/tsn.yaml --weights tsn.pdparams --save_dir EXPORT
    python jobs/export.py --config configs/attention_lstm.yaml --weights CKPT --save_dir EXPORT
    python jobs/export.py --config configs/tag.yaml --model_dir REGISTRY --save_dir EXPORT   # both models

MODEL.name picks what is exported (TSN, AttentionLSTM, or VideoTag for both). Exit codes: 0 done, 2 bad configuration.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from vtplatform import cli


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--save_dir", required=True, help="output folder or s3:// prefix")
    p.add_argument("--weights", default=None, help="the weights of MODEL.name's model")
    p.add_argument("--tsn_weights", default=None, help="TSN weights, for MODEL.name VideoTag")
    p.add_argument("--lstm_weights", default=None, help="AttentionLSTM weights, for MODEL.name VideoTag")
    p.add_argument("--model_dir", default=None, help="a model registry (its champion), for MODEL.name VideoTag")
    args = p.parse_args()
    cli.setup_logging(args.log_level)

    from vtplatform.champions import resolve_model_dir
    from vtplatform.config import load_config
    from vtplatform.export import run_export

    config = load_config(args.config, args.override)
    tsn, lstm = args.tsn_weights, args.lstm_weights
    if config.model.name == "TSN":
        tsn = args.weights or tsn
    elif config.model.name == "AttentionLSTM":
        lstm = args.weights or lstm
    if args.model_dir:
        champion_tsn, champion_lstm = resolve_model_dir(args.model_dir, config.storage)
        tsn, lstm = tsn or champion_tsn, lstm or champion_lstm
    manifest = run_export(config, args.save_dir, tsn, lstm)
    print(json.dumps(manifest, indent=1), flush=True)
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
