"""Orbax checkpoints of the train state and the grain iterator, saved together.

Items per step: "params" and "opt_state" (sharded arrays), "data_state" (the input iterator's
state, one JSON for all processes: every process's state gathered and merged by the iterator's
`merge_states`, so a run resumes on another number of processes), "meta" (step, config summary,
the resolved training config and a checksum of every saved array). Checkpoints of earlier
versions hold "data" instead (grain's per-process files), which restores with the same number of
processes only. Keeping params separate lets evaluation and export read a checkpoint without
the optimiser state.

Resume precedence (train.py): a checkpoint in the workdir -> `config.init` -> random init.

Faults: the newest checkpoint that restores and matches its checksums is resumed; a broken newer
one is logged by path and moved aside (STEP.unrestorable), so it neither counts towards
keep_checkpoints nor blocks saving that step again. When none restores the run stops naming the
directory instead of starting over on top of it. A failed save (disk full, permissions) stops the
run naming the step directory: Orbax saves in the background, so the error surfaces at the next
save or at close, and a failed save deletes no older checkpoint. Uncommitted Orbax temporary
directories (a save killed midway) are never restored and are removed when training reopens the
directory.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

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


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or a directory none of whose checkpoints
    restores; the message names the path and the underlying error."""


class ShapeMismatchError(ValueError):
    """A checkpoint written for another model shape, or an earlier version's per-process data
    state for another process count (a config mistake, not a broken file)."""


# Suffix a checkpoint that failed to restore is renamed to (STEP.unrestorable), kept for a look.
UNRESTORABLE_SUFFIX = ".unrestorable"


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
        raise ShapeMismatchError(
            f"{what} was written for another model shape; {len(problems)} tensors differ:\n"
            f"{shown}{more}"
        )


def _as_uint32(x):
    """The array's bits as uint32 words (one per element; 8-byte types folded into one)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    if x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if x.dtype.itemsize == 8:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
        return words[..., 0] ^ (words[..., 1] * jnp.uint32(0x85EBCA6B))
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _leaf_checksum(x):
    # Sum of each element's bits times an odd weight drawn from its position, modulo 2**32:
    # integer sums do not depend on the reduction order, so any mesh gives the same value,
    # and an odd weight makes every single changed element change the sum.
    bits = _as_uint32(x)
    position = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
    weight = (position * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
    return jnp.sum(bits * weight, dtype=jnp.uint32)


_checksum_tree = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def tree_checksums(tree) -> dict[str, int]:
    """{tensor name: checksum of its bits} for a tree of (possibly sharded) arrays, computed
    on the devices; silent damage to a file (overwritten bytes) shows as a mismatch."""
    sums = _checksum_tree(tree)
    flat = jax.tree_util.tree_flatten_with_path(sums)[0]
    # Scalars are replicated: every process reads its own copy.
    return {jax.tree_util.keystr(p): int(np.asarray(v.addressable_data(0))) for p, v in flat}


def _checksum_mismatches(stored: dict, restored: dict) -> list[str]:
    return [name for name, value in stored.items() if restored.get(name) != value]


def _short(error: BaseException, limit: int = 400) -> str:
    """One line of an error: TensorStore's messages carry their whole spec."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (a partly failed restore fails everywhere)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.array([ok]))
    return bool(np.all(flags))


def item_handlers(with_data: bool = True) -> dict:
    """Handlers named up front, so metadata can be read before the first restore."""
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    if with_data:
        handlers["data_state"] = ocp.JsonCheckpointHandler()
        handlers["data"] = grain.checkpoint.CheckpointHandler()  # earlier checkpoints
    return handlers


def _gather_json(value) -> list:
    """Every process's JSON-able `value`, in process order (a host exchange: checkpoints only)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes.reshape(-1), strict=True)]


def _data_save_args(data_iter) -> dict:
    if hasattr(data_iter, "merge_states"):
        shared = data_iter.merge_states(_gather_json(data_iter.get_state()))
        if jax.process_count() > 1:  # the running counters become exact again
            data_iter.adopt_merged(shared, jax.process_index())
        return {"data_state": ocp.args.JsonSave(shared)}
    return {"data": grain.checkpoint.CheckpointSave(data_iter)}  # an iterator of another kind


class Checkpointer:
    """A thin wrapper over ocp.CheckpointManager with the items above, which raises what its
    background saves hit and resumes from the newest checkpoint that restores."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(int(every), 1),
            create=True,
            enable_async_checkpointing=async_save,
            # A save killed midway leaves STEP.orbax-checkpoint-tmp-*: never a step, removed.
            cleanup_tmp_directories=True,
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=item_handlers()
        )
        self._in_flight = None  # the step whose background save has not been waited for

    def step_path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_iter, meta: dict, force=False) -> bool:
        """Starts a save (in the background); a CheckpointError names the step directory when
        this save, or the previous one still in flight, fails."""
        if not (force or self.manager.should_save(step)):
            return False
        self.wait()
        checksums = {"params": tree_checksums(params), "opt_state": tree_checksums(opt_state)}
        args = {
            "params": ocp.args.StandardSave(params),
            "opt_state": ocp.args.StandardSave(opt_state),
            "meta": ocp.args.JsonSave({"step": int(step), **meta, "checksums": checksums}),
        }
        if data_iter is not None:
            args.update(_data_save_args(data_iter))
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # noqa: BLE001 (any failure to write stops the run, named)
            raise self._save_error(step, e) from e
        if saved:
            self._in_flight = step
            logging.info("checkpoint: saving step %d (async)", step)
        return saved

    def _save_error(self, step, error) -> CheckpointError:
        where = self.step_path(step) if step is not None else self.directory
        return CheckpointError(
            f"saving the checkpoint {where} failed ({_short(error)}); the run stops rather "
            "than train on without checkpoints. Free space or fix the permissions, then rerun "
            "the same command: it resumes from the last complete checkpoint"
        )

    def restore(self, step: int, abstract_params, abstract_opt_state, data_iter):
        """Restores onto the target shardings carried by the abstract trees, checking each
        array against the checksum saved with it."""
        metadata = self.manager.item_metadata(step)
        if not jax.tree.leaves(metadata["params"]):
            raise CheckpointError(f"{self.step_path(step)}/params has no array metadata")
        check_shapes(metadata["params"], abstract_params, f"checkpoint step {step}")
        args = {
            "params": ocp.args.StandardRestore(abstract_params),
            "opt_state": ocp.args.StandardRestore(abstract_opt_state),
            "meta": ocp.args.JsonRestore(),
        }
        shared = data_iter is not None and (self.step_path(step) / "data_state").exists()
        if shared:
            args["data_state"] = ocp.args.JsonRestore()
        elif data_iter is not None:
            self._check_per_process_data(step)
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        params, opt_state, meta = restored["params"], restored["opt_state"], restored["meta"]
        if shared:
            data_iter.set_shared_state(restored["data_state"], jax.process_index())
        self._verify_checksums(step, meta.get("checksums"), params, opt_state)
        return params, opt_state, meta

    def _check_per_process_data(self, step) -> None:
        """An earlier version's per-process data state restores with its process count only."""
        data = self.step_path(step) / "data"
        wanted = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if data.exists() and not (data / wanted).exists():
            written = sorted(p.name for p in data.iterdir())
            raise ShapeMismatchError(
                f"{data} holds the input pipeline's state per process ({', '.join(written)}), "
                f"written by an earlier version: resume it with that number of processes"
            )

    def _verify_checksums(self, step, stored, params, opt_state) -> None:
        if not stored:  # written before checksums were saved
            return
        restored = {"params": params, "opt_state": opt_state}
        bad = [
            f"{item}{name}"
            for item, tree in restored.items()
            for name in _checksum_mismatches(stored.get(item, {}), tree_checksums(tree))
        ]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise CheckpointError(
                f"{self.step_path(step)}: the restored {', '.join(bad[:3])}{more} do not match "
                "the checksums saved with them (damaged files)"
            )

    def restore_latest(self, abstract_params, abstract_opt_state, data_iter):
        """(params, opt_state, meta, step) from the newest checkpoint that restores, or None
        when there is none. Each one that fails is logged by path and, once an older one
        restored, moved aside; when none restores, a CheckpointError names the directory."""
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.restore(step, abstract_params, abstract_opt_state, data_iter)
                error = None
            except ShapeMismatchError:  # the model changed: older steps cannot help
                raise
            except Exception as e:  # noqa: BLE001 (whatever broke the files, try the next)
                restored, error = None, e
            if _all_processes_agree(error is None):
                self._set_aside([s for s, _ in failed])
                return (*restored, step)
            error = error or CheckpointError("it restored here but not on another process")
            logging.warning(
                "checkpoint %s does not restore (%s); trying the one before it",
                self.step_path(step),
                _short(error),
            )
            failed.append((step, error))
        if not failed:
            return None
        listed = "; ".join(f"{self.step_path(s)}: {_short(e, 200)}" for s, e in failed)
        raise CheckpointError(
            f"no checkpoint under {self.directory} restores ({listed}). If the files are "
            "intact, the config no longer matches them (a changed model or optimiser); else "
            "repair or move them away, or pick another --workdir. Starting from step 0 here "
            "would overwrite them"
        )

    def _set_aside(self, steps) -> None:
        """Renames checkpoints that failed to restore to STEP.unrestorable(-N), so Orbax
        neither counts them towards keep_checkpoints nor refuses to save their step again."""
        if not steps:
            return
        error = None
        if jax.process_index() == 0:
            try:
                for step in steps:
                    self._rename_aside(step)
            except Exception as e:  # noqa: BLE001 (e.g. a store without directory renames)
                error = e
        if not _all_processes_agree(error is None):  # also the barrier before reloading
            raise CheckpointError(
                f"cannot move the unrestorable checkpoints {steps} under {self.directory} "
                f"aside ({_short(error) if error else 'on process 0'}); move or delete them, "
                "then rerun"
            ) from error
        self.manager.reload()

    def _rename_aside(self, step: int) -> None:
        source = self.step_path(step)
        target = self.directory / f"{step}{UNRESTORABLE_SUFFIX}"
        n = 1
        while target.exists():
            target, n = self.directory / f"{step}{UNRESTORABLE_SUFFIX}-{n}", n + 1
        source.rename(target)
        logging.warning("moved the unrestorable checkpoint %s to %s", source, target)

    def wait(self) -> None:
        """Waits for the background save; raises a CheckpointError naming it if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (Orbax re-raises the background error here)
            raise self._save_error(step, e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def latest_stored_config(workdir: str):
    """(step, the training config stored with it or None) for the newest checkpoint whose meta
    reads, or None without checkpoints. Read-only: nothing is cleaned or moved here."""
    if not has_checkpoint(workdir):
        return None
    options = ocp.CheckpointManagerOptions(read_only=True)
    path = checkpoint_dir(workdir)
    with ocp.CheckpointManager(path, options=options, item_handlers=item_handlers()) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                restored = manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )
            except Exception as e:  # noqa: BLE001 (the restore reports broken steps by path)
                logging.debug("no readable meta in %s/%d: %s", path, step, _short(e))
                continue
            return step, restored["meta"].get("config")
    return None


def read_workdir_config(workdir: str):
    """The resolved config a run wrote into its workdir, as a ConfigDict."""
    import ml_collections

    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{workdir} has no config.json; expected a workdir written by beta_clip_jax.main"
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_params_from_workdir(workdir: str, abstract_params, step: int | None = None):
    """(params as numpy arrays, model config, step) from a workdir's latest (or given)
    checkpoint. `abstract_params(model_cfg)` gives the unboxed abstract params to restore onto
    (step.abstract_params): this module knows no model, its callers do."""
    config = read_workdir_config(workdir)
    path = checkpoint_dir(workdir)
    if not has_checkpoint(workdir):
        raise FileNotFoundError(f"no checkpoint under {path}; train first or pass another path")
    # Every item named (data included), so Orbax does not warn about the ones left unrestored.
    with ocp.CheckpointManager(path, item_handlers=item_handlers()) as manager:
        step = manager.latest_step() if step is None else int(step)
        if step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} under {path}")
        abstract = abstract_params(config.model)
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


def write_json(path: str, obj) -> None:
    if jax.process_index() == 0:
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = epath.Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        os.replace(str(tmp), str(path)) if "://" not in str(path) else tmp.rename(path)
