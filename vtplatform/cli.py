"""What every ``jobs/*.py`` entry point shares: flags, logging, Ray start-up, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from vtplatform.config import ConfigError
from vtplatform.storage import redact

log = logging.getLogger("vtplatform")

EXIT_OK, EXIT_NOTHING_SUCCEEDED, EXIT_CONFIG = 0, 1, 2


def parser(description: str) -> argparse.ArgumentParser:
    """The seed's flags (``--config``) plus ``-o SECTION.key=value`` overrides."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config (the seed's files load as they are)")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="SECTION.key=value",
        help="override a config key; repeatable",
    )
    p.add_argument("--log_level", default=os.environ.get("VTP_LOG_LEVEL", "INFO"))
    return p


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def init_ray(**kwargs) -> None:
    """Joins the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else starts a local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, **kwargs)


def run(main: Callable[[], int]) -> None:
    """Runs ``main`` and exits: its code, 2 for a configuration error (one clear line), 130 on Ctrl-C."""
    try:
        code = main()
    except ConfigError as exc:
        log.error("configuration error: %s", redact(str(exc)))
        code = EXIT_CONFIG
    except KeyboardInterrupt:
        code = 130
    finally:
        if "ray" in sys.modules:
            import ray

            ray.shutdown()
    sys.exit(code)
