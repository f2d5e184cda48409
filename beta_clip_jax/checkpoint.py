"""Orbax checkpoints of the train state and the grain iterator, saved together.

Items per step: "params" and "opt_state" (sharded arrays), "data" (the input iterator's state, one
file per process), "meta" (step and config summary). Keeping params separate lets evaluation and
export read a checkpoint without the optimiser state.

Resume precedence (train.py): a checkpoint in the workdir -> `config.init` -> random init.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> epath.Path:
    # Orbax refuses relative paths; a relative local workdir means one under the current
    # directory (`--workdir=runs/demo`). Remote paths (gs://...) are absolute already.
    if "://" not in str(workdir):
        workdir = os.path.abspath(workdir)
    return epath.Path(workdir) / CHECKPOINT_DIR


def has_checkpoint(workdir: str) -> bool:
    path = checkpoint_dir(workdir)
    return path.exists() and any(p.name.isdigit() for p in path.iterdir())


def _flat_shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(getattr(v, "shape", ())) for p, v in flat}


def check_shapes(saved, target, what: str) -> None:
    """Rejects a checkpoint whose tensors differ from the model's, naming each difference."""
    saved_shapes, target_shapes = _flat_shapes(saved), _flat_shapes(target)
    problems = []
    for name in sorted(set(saved_shapes) | set(target_shapes)):
        a, b = saved_shapes.get(name), target_shapes.get(name)
        if a is None:
            problems.append(f"  {name}: missing in checkpoint (model has {b})")
        elif b is None:
            problems.append(f"  {name}: in checkpoint {a}, not in model")
        elif a != b:
            problems.append(f"  {name}: checkpoint {a} vs model {b}")
    if problems:
        shown = "\n".join(problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise ValueError(
            f"{what} was written for another model shape; {len(problems)} tensors differ:\n"
            f"{shown}{more}"
        )


def item_handlers(with_data: bool = True) -> dict:
    """Handlers named up front, so metadata can be read before the first restore."""
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    if with_data:
        handlers["data"] = grain.checkpoint.CheckpointHandler()
    return handlers


class Checkpointer:
    """A thin wrapper over ocp.CheckpointManager with the items above."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(int(every), 1),
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=item_handlers()
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_iter, meta: dict, force=False) -> bool:
        args = {
            "params": ocp.args.StandardSave(params),
            "opt_state": ocp.args.StandardSave(opt_state),
            "meta": ocp.args.JsonSave({"step": int(step), **meta}),
        }
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        if saved:
            logging.info("checkpoint: saving step %d (async)", step)
        return saved

    def restore(self, step: int, abstract_params, abstract_opt_state, data_iter):
        """Restores onto the target shardings carried by the abstract trees."""
        metadata = self.manager.item_metadata(step)
        check_shapes(metadata["params"], abstract_params, f"checkpoint step {step}")
        args = {
            "params": ocp.args.StandardRestore(abstract_params),
            "opt_state": ocp.args.StandardRestore(abstract_opt_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["params"], restored["opt_state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_workdir_config(workdir: str):
    """The resolved config a run wrote into its workdir, as a ConfigDict."""
    import ml_collections

    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{workdir} has no config.json; expected a workdir written by beta_clip_jax.main"
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_params_from_workdir(workdir: str, step: int | None = None):
    """(params as numpy arrays, model config) from a workdir's latest (or given) checkpoint."""
    from beta_clip_jax.models.clip import build_model

    config = read_workdir_config(workdir)
    path = checkpoint_dir(workdir)
    if not has_checkpoint(workdir):
        raise FileNotFoundError(f"no checkpoint under {path}; train first or pass another path")
    # Every item named (data included), so Orbax does not warn about the ones left unrestored.
    with ocp.CheckpointManager(path, item_handlers=item_handlers()) as manager:
        step = manager.latest_step() if step is None else int(step)
        if step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} under {path}")
        model = build_model(config.model)
        abstract = abstract_params(model, config)
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), abstract
        )
        check_shapes(manager.item_metadata(step)["params"], target, f"{path}/{step}")
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
        )
    params = jax.tree.map(np.asarray, restored["params"])
    return params, config.model, step


def abstract_params(model, config):
    """Unboxed abstract params of the model (shapes only, nothing allocated)."""
    import flax.linen as nn

    from beta_clip_jax.step import dummy_inputs

    boxed = jax.eval_shape(
        lambda rng: model.init(rng, *dummy_inputs(config))["params"], jax.random.key(0)
    )
    return nn.unbox(boxed)


def write_json(path: str, obj) -> None:
    if jax.process_index() == 0:
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = epath.Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        os.replace(str(tmp), str(path)) if "://" not in str(path) else tmp.rename(path)
