"""Command line: python -m beta_clip_jax.main --config=configs/NAME.py --workdir=DIR.

Rerunning the same command with the same workdir resumes. `--config.FIELD=VALUE` overrides a field;
the config is locked, so a misspelt field is an error naming it.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks for config mistakes too.")
# Exit status of a config mistake (a misspelt field, a missing path, a bad value), as for a
# command-line usage error.
CONFIG_ERROR_STATUS = 2


def _config_error(message: str) -> None:
    print(f"beta_clip_jax: {message}", file=sys.stderr)
    sys.exit(CONFIG_ERROR_STATUS)


def _field_suggestion(argv: list[str], error: Exception) -> str:
    """The message for a --config.FIELD that the config file does not have."""
    text = str(error).strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    key, _, hint = text.partition("\n")
    key = key.strip("'")
    given = [
        a.split("=", 1)[0].removeprefix("--config.") for a in argv if a.startswith("--config.")
    ]
    field = next((g for g in given if g.split(".")[-1] == key), key)
    suggestion = re.search(r'Did you mean "([^"]+)"', hint)
    parent = field.rpartition(".")[0]
    better = f"{parent}.{suggestion.group(1)}" if suggestion and parent else None
    if suggestion and not parent:
        better = suggestion.group(1)
    advice = f"; did you mean config.{better}?" if better else ""
    return (
        f"config.{field} is not a field of the config file{advice} "
        "(--config.FIELD=VALUE can only set fields the file defines; --debug shows the traceback)"
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a misspelt --config.FIELD reported in one line (exit 2)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _config_error(str(e))
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
        if "--debug" in argv:
            raise
        _config_error(_field_suggestion(argv, e))


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
    from beta_clip_jax.checkpoint import CheckpointError
    from beta_clip_jax.config_check import ConfigError
    from beta_clip_jax.data.pipeline import DataSkipError
    from beta_clip_jax.train import STOPPED_EXIT_STATUS, Stopped, train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except Stopped as e:
        logging.warning("%s", e)
        sys.exit(STOPPED_EXIT_STATUS)
    except (DataSkipError, CheckpointError) as e:
        # Too many unusable records (the message names them and the fixes), a failed save or
        # a checkpoint directory none of whose steps restores (the message names the path).
        if _DEBUG.value:
            raise
        sys.exit(f"beta_clip_jax: {e}")
    except (ConfigError, FileNotFoundError) as e:
        # Bad sizes, paths, names or fields: the message says what to change; a traceback
        # would not (--debug shows it).
        if _DEBUG.value:
            raise
        _config_error(str(e))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
