"""Command line: python -m beta_clip_jax.main --config=configs/NAME.py --workdir=DIR.

Rerunning the same command with the same workdir resumes. `--config.FIELD=VALUE` overrides a field;
the config is locked, so a misspelt field is an error naming it.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")


class _QuietLibraries(logging.Filter):
    """Keeps Orbax's and grain's per-save INFO chatter off the console; warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "etils"))
        return record.levelno >= logging.WARNING or not noisy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from beta_clip_jax import distributed

    distributed.maybe_initialize()
    import jax

    # Only process 0 talks at INFO; the others warn and fail loudly.
    root = logging.getLogger()
    root.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    for handler in root.handlers:
        handler.addFilter(_QuietLibraries())
    from beta_clip_jax.config_check import ConfigError
    from beta_clip_jax.train import train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError) as e:
        # Bad sizes, paths or fields: the message says what to change; a traceback would not.
        sys.exit(f"beta_clip_jax: {e}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
