"""Config drift: what a rerun of a workdir may change before it resumes from a checkpoint.

Every checkpoint stores the resolved training config it was written with (meta item "config";
per step, so it survives keep_checkpoints deleting older steps). A rerun compares the new
config with the one stored in the newest checkpoint before anything compiles:

- a change of a field that alters what is computed (model, loss, data order and content,
  batch_size, optim, schedule: num_steps / num_epochs, seed) stops the run with a ConfigError
  listing each one as `field: old -> new`, unless `--config.allow_config_change=True`, which
  logs them as a warning and resumes with the new values (later checkpoints store them);
- a change of an operational field (OPERATIONAL_FIELDS below: cadences, paths of outputs,
  workers, device layout, telemetry) is logged and allowed;
- a checkpoint written before configs were stored resumes with a one-line warning.

The mesh is operational: the same batch over another device layout computes the same step (up
to float summation order), which is what resuming on a different slice needs; batch_size and
optim.grad_accum are not (the negatives of the contrastive losses come from the micro-batch).
model.remat and model.scan_layers only trade memory and compile time for the same math.
data.path / data.image_root count as content: a moved dataset resumes with
allow_config_change=True, which logs the move.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from typing import Any, NamedTuple

from beta_clip_jax.config_check import ConfigError

# Dotted field names (fnmatch patterns) that may change between a checkpoint and its resume.
OPERATIONAL_FIELDS = (
    "mode",
    "init",  # only read by a fresh start
    "allow_config_change",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "stop_at_step",
    "write_plots",
    "profile_steps",
    "peak_tflops",
    "evals",
    "evals.*",  # what is evaluated, how often, from where
    "wandb",
    "wandb.*",
    "mesh.*",  # device layout, see above
    "model.remat",
    "model.scan_layers",
    "data.num_workers",
    "data.num_threads",
    "data.prefetch",
    # When to give up on bad records, not which records are read.
    "data.max_skip_fraction",
    "data.min_records_for_skip_check",
    "data.max_replacement_attempts",
)


class _Absent:
    def __repr__(self):
        return "(absent)"


ABSENT = _Absent()  # the value of a field one of the two configs does not have


class FieldChange(NamedTuple):
    field: str
    old: Any
    new: Any

    def __str__(self):
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


def _show(value) -> str:
    return repr(value) if value is ABSENT else json.dumps(value, sort_keys=True)


def stored_form(config) -> dict:
    """config.to_dict() as JSON gives it back (tuples as lists, odd values as strings), so a
    stored config and a new one compare field by field."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} for nested dicts; an empty dict is a leaf of its own."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(old: dict, new: dict) -> list[FieldChange]:
    """Every leaf field added, removed or changed from `old` to `new`, sorted by name."""
    a, b = flatten(old), flatten(new)
    changes = []
    for field in sorted(set(a) | set(b)):
        before, after = a.get(field, ABSENT), b.get(field, ABSENT)
        if before is ABSENT or after is ABSENT or before != after:
            changes.append(FieldChange(field, before, after))
    return changes


def is_operational(field: str) -> bool:
    return any(fnmatch.fnmatchcase(field, pattern) for pattern in OPERATIONAL_FIELDS)


def check_resume(config, stored: dict | None, where: str) -> list[FieldChange]:
    """Compares the run's config with the one stored in the checkpoint at `where`; raises a
    ConfigError for computational changes unless config.allow_config_change. Returns them."""
    if stored is None:
        logging.warning(
            "%s has no stored config (written before configs were stored); resuming without "
            "comparing configs",
            where,
        )
        return []
    changes = config_changes(stored, stored_form(config))
    # A field only one side has comes from another version of this code (a field added or
    # dropped since), not from the user: the stored run could not have set it.
    versioned = [c for c in changes if c.old is ABSENT or c.new is ABSENT]
    if versioned:
        logging.warning(
            "%s was written by another version of beta_clip_jax; fields it lacks or only it "
            "has are taken as unchanged: %s",
            where,
            "; ".join(map(str, versioned)),
        )
    changes = [c for c in changes if c not in versioned]
    operational = [c for c in changes if is_operational(c.field)]
    drift = [c for c in changes if not is_operational(c.field)]
    if operational:
        logging.info(
            "resuming %s with operational changes: %s", where, "; ".join(map(str, operational))
        )
    if not drift:
        return []
    listed = "\n".join(f"  {c}" for c in drift)
    if config.get("allow_config_change", False):
        logging.warning(
            "resuming %s with a changed config (allow_config_change=True):\n%s", where, listed
        )
        return drift
    raise ConfigError(
        f"the config differs from the one {where} was trained with:\n{listed}\n"
        "rerun with the same config, pick a new --workdir, or pass "
        "--config.allow_config_change=True to resume with the new values"
    )
