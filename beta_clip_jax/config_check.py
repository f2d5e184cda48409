"""Checks that a config can work on this machine, before anything is compiled.

Each error names the numbers involved, so the user can see what to change without a traceback.
"""

from __future__ import annotations

import jax

from beta_clip_jax import losses, methods, optim, sharding
from beta_clip_jax.losses import cal

MODES = ("train", "eval")


class ConfigError(ValueError):
    """A config that cannot work here; main prints it without a traceback."""


def resolve_config(config):
    """A copy with the method settled (config.method and loss.name name it, model.method its
    model) and every model shape filled in from its variant: what config.json records."""
    import copy

    resolved = copy.deepcopy(config)
    try:
        method = config_method(config)
        with resolved.unlocked():
            resolved.method = method.name
            # model.method names the model: a method without a model of its own trains the
            # plain one, so its workdirs read (and resume) as they did before config.method.
            resolved.model.method = "beta_clip" if method.plain_model else method.name
            resolved.loss.name = method.name
            resolved.model = methods.resolve_model_config(resolved.model)
    except ValueError as e:  # an unknown method, variant or field: a config mistake, named
        raise ConfigError(str(e)) from e
    return resolved


def config_method(config) -> methods.Method:
    """The registered method the config names: config.method, else loss.name (how configs
    named it before config.method existed), else model.method, else "beta_clip".

    Every one of the three that is set must name that method, except that model.method may
    be "beta_clip" for a method whose model is the plain one (resolve_config sets it so, and
    older configs of the clip loss read as they did); anything else is an error naming the
    field.
    """
    fields = (
        ("config.method", config.get("method") or ""),
        ("loss.name", config.loss.get("name") or ""),
        ("model.method", config.model.get("method") or ""),
    )
    field, name = next(((f, v) for f, v in fields if v), ("config.method", "beta_clip"))
    method = methods.get_method(name, field)
    for other, value in fields:
        plain_model = other == "model.method" and value == "beta_clip"
        if value and value != method.name and not (plain_model and method.plain_model):
            raise ValueError(
                f"{other}={value!r} disagrees with {field}={method.name!r}: set config.method "
                "alone (loss.name follows it, model.method names its model)"
            )
    return method


def check_config(config, device_count: int, process_count: int) -> None:
    try:
        _check_config(config, device_count, process_count)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _check_config(config, device_count: int, process_count: int) -> None:
    if config.mode not in MODES:
        raise ValueError(f"config.mode must be one of {MODES}, got {config.mode!r}")
    _check_names(config)
    optim.check_lock(config.optim, config.model)
    shape = sharding.mesh_shape(config.mesh, device_count)
    dp = shape[0] * shape[1]
    batch = int(config.batch_size)
    accum = int(config.optim.get("grad_accum", 1))
    if batch <= 0:
        raise ValueError(f"batch_size must be positive, got {batch}")
    if accum < 1 or batch % accum:
        raise ValueError(f"batch_size {batch} is not divisible by optim.grad_accum {accum}")
    micro = batch // accum
    if micro % dp:
        raise ValueError(
            f"micro-batch {micro} (batch_size {batch} / grad_accum {accum}) is not divisible "
            f"by the data-parallel size {dp} (mesh data={shape[0]} x fsdp={shape[1]})"
        )
    if batch % process_count:
        raise ValueError(f"batch_size {batch} is not divisible by {process_count} processes")
    if config.model.get("attention") == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(
            "model.attention='cudnn' needs an NVIDIA GPU, but JAX's backend here is "
            f"{jax.default_backend()!r}; use 'auto' or 'xla'"
        )
    method = config_method(config)
    scope = cal.check_cal_scope(config.loss)
    gradient = config.loss.get("global_gradient", "full")
    if gradient not in losses.GLOBAL_GRADIENTS:
        raise ValueError(
            f"loss.global_gradient must be one of {losses.GLOBAL_GRADIENTS}, got {gradient!r}"
        )
    # A global β-CAL takes its negatives from the whole micro-batch: no group size applies.
    if method.uses_cal and scope == "group":
        group = int(config.loss.group_size)
        if group <= 0 or micro % group:
            raise ValueError(
                f"micro-batch {micro} is not divisible by the β-CAL group loss.group_size "
                f"{group}; choose batch_size / grad_accum as a multiple of the group"
            )
    if config.data.get("pack_texts"):
        _check_packing(config, method, micro, accum, dp, process_count)
    if int(config.log_every) <= 0 or int(config.checkpoint_every) <= 0:
        raise ValueError("log_every and checkpoint_every must be positive")
    _check_telemetry(config)
    check_paths(config)
    if config.mode == "train" and total_steps(config) <= 0:
        raise ValueError("num_steps (or num_epochs) must give at least one step")
    if config.mode == "train" and method.uses_cal:
        _check_cal_start(cal.cal_start_step(config.loss), total_steps(config))
    method.check_config(config)


def _check_names(config) -> None:
    """Names that would otherwise fail only once data loading or the loss trace starts."""
    from beta_clip_jax.data.sources import FILE_FORMATS, SOURCE_NAMES, pixel_limit

    pixel_limit(config.data.get("max_image_pixels"))
    choices = (
        ("data.name", config.data.name, SOURCE_NAMES),
        ("loss.mode", config.loss.mode, ("ce", "bce")),
    )
    for field, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{field}={value!r} is not one of {', '.join(map(str, allowed))}")
    reads_path = ("jsonl", "sharegpt4v", "urban1k", *FILE_FORMATS)
    data = config.data
    if data.name in reads_path and not (data.get("path") or data.get("shards")):
        raise ValueError(
            f"data.name={data.name!r} reads data.path, which is not set: "
            "--config.data.path=FILE (docs/data.md says what the file holds)"
        )


WANDB_MODES = ("", "online", "offline", "disabled")


def _check_telemetry(config) -> None:
    """The profiler range and the W&B mode: mistakes here would surface only steps later."""
    from beta_clip_jax.profiling import parse_profile_steps

    parse_profile_steps(config.get("profile_steps", ""))
    mode = config.get("wandb", {}).get("mode", "")
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode={mode!r} is not one of online, offline, disabled")


def _check_packing(config, method, micro: int, accum: int, dp: int, process_count: int) -> None:
    """Packed batches (data.pack_texts): whole groups per device and micro-batch, rows that
    hold the longest text, a method that reads only the pooled text embeddings."""
    from beta_clip_jax.data import hierarchy, packing

    data = config.data
    group = int(data.pack_group)
    per_device = micro // dp
    if group <= 0 or per_device % group:
        raise ValueError(
            f"data.pack_group {group} must divide the micro-batch per device, {per_device} "
            f"(batch_size {config.batch_size} / grad_accum {accum} / data-parallel size {dp}); "
            "set data.pack_group to a divisor, e.g. 1"
        )
    longest = max(hierarchy.level_lengths(data).values())
    row = packing.pack_length(data)
    if row < longest:
        raise ValueError(f"data.pack_length {row} is shorter than the longest text level {longest}")
    if row > int(config.model.context_length):
        raise ValueError(
            f"data.pack_length {row} exceeds the model's context length "
            f"{config.model.context_length}"
        )
    if not method.packed_texts:
        raise ValueError(
            f"data.pack_texts does not work with config.method={method.name!r} (it reads "
            "per-text token states); set data.pack_texts=False"
        )


def _check_cal_start(start: int, steps: int) -> None:
    """β-CAL switched on at or after the last step would silently train plain CLIP."""
    if start < 0:
        raise ValueError(f"loss.cal_start_step must be >= 0, got {start}")
    if start >= steps:
        raise ValueError(
            f"loss.cal_start_step {start} is not before the run's last step ({steps} steps): "
            "β-CAL would never be trained; lower it or raise num_steps"
        )


PATH_FIELD_NAMES = ("path", "image_root", "annotations", "root")
PATH_FIELD_SUFFIXES = ("_path", "_dir", "_root", "_file")


def _path_fields(cfg, prefix: str):
    for key, value in cfg.items():
        name = f"{prefix}.{key}"
        if hasattr(value, "items"):
            yield from _path_fields(value, name)
        elif (
            isinstance(value, str)
            and value
            and (key in PATH_FIELD_NAMES or key.endswith(PATH_FIELD_SUFFIXES))
        ):
            yield name, value


def missing_paths(config) -> list[str]:
    """Every configured file or folder that does not exist, as 'config.field = path' lines."""
    fields = list(_path_fields(config.data, "config.data"))
    if config.get("evals"):
        fields += list(_path_fields(config.evals, "config.evals"))
    missing = [f"  {name} = {path}" for name, path in fields if not _exists(name, path)]
    if config.init:
        from beta_clip_jax.convert import weights_location

        try:  # every prefix of an init spec, hub ids in the local cache included
            if not _exists("config.init", weights_location(str(config.init))):
                missing.append(f"  config.init = {config.init}")
        except FileNotFoundError as e:
            missing.append(f"  config.init = {config.init} ({str(e).splitlines()[0]})")
    return missing


def _exists(name: str, path: str) -> bool:
    """A file or folder exists; config.data.path may also be a shard pattern naming at least
    one file (a brace pattern, a glob, or the PREFIX of PREFIX-00000-of-0000N shards)."""
    from etils import epath

    from beta_clip_jax.data import fileio

    if epath.Path(path).exists():
        return True
    if name != "config.data.path":
        return False
    try:
        return bool(fileio.expand_shards(path, "", "data"))
    except (FileNotFoundError, ValueError):
        return False


def check_paths(config) -> None:
    """Stops before any compile when configured data or weights are missing, listing them all."""
    missing = missing_paths(config)
    if missing:
        raise FileNotFoundError(
            "these configured paths do not exist:\n" + "\n".join(missing) + "\n"
            "set them with --config.FIELD=PATH (see the config file's docstring for the "
            "expected layout and where to get the data and weights)"
        )


def total_steps(config) -> int:
    """num_steps, or num_epochs over the training set when num_epochs > 0."""
    epochs = float(config.get("num_epochs", 0) or 0)
    if epochs <= 0:
        return int(config.num_steps)
    return max(1, int(round(epochs * train_set_size(config) / int(config.batch_size))))


def train_set_size(config) -> int:
    """Records the training source offers after skip_first, the eval_fraction hold-out and
    max_records (the range pipeline.train_range reads)."""
    from beta_clip_jax.data import sources

    data = config.data
    size = int(data.get("image_size") or config.model.get("image_size") or 224)
    total = len(sources.make_source(data, size))
    skip = data.skip_first
    skip = int(sources.default_skip_first(data.name) if skip is None else skip)
    end, _ = sources.held_out_range(total, data.get("eval_fraction", 0.0), skip)
    num = max(end - skip, 0)
    return num if data.max_records is None else min(num, int(data.max_records))
