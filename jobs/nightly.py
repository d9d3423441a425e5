"""The nightly run: incremental extract -> fine-tune from the champion -> eval gate -> promote -> tag.

    python jobs/nightly.py --config configs/nightly.yaml [-o nightly.registry=s3://BUCKET/registry ...]
    ray job submit --working-dir . -- python jobs/nightly.py --config configs/nightly.yaml

A second run with no new data does nothing new; a run that was killed resumes at its step. With
nightly.segment_seconds it also keeps the segment tags of every library video up to date with the
champion, in REGISTRY/segments/<model_id>/ (a new champion re-tags the library there).
Exit codes: 0 done, 2 bad configuration.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from vtplatform import cli


def main() -> int:
    args = cli.parser(__doc__.splitlines()[0]).parse_args()
    cli.setup_logging(args.log_level)

    from vtplatform.config import load_config
    from vtplatform.nightly import run_nightly

    config = load_config(args.config, args.override)
    cli.init_ray()
    summary = run_nightly(config)
    print(summary.format(), flush=True)
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
