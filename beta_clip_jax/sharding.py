"""Device mesh, logical axis rules and the shardings of parameters and batches.

Parameters carry logical axis names (see docs/CONTRACTS.md); one rules table maps them to the mesh
axes ("data", "fsdp", "tensor"). With `mesh.fsdp == 1` the parameters are replicated over the
data-parallel devices; with `mesh.fsdp > 1` their "embed" dimension is split over that axis (FSDP).
"""

from __future__ import annotations

import logging
import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that holds copies of the model's compute.
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("patch", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolves the configured axis sizes (one may be -1) against the device count."""
    sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
    named = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {named}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {named}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh: {named} cannot fill {num_devices} devices "
                f"({num_devices} is not a multiple of {known})"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: {named} multiplies to {math.prod(sizes)}, but there are {num_devices} devices"
        )
    return tuple(sizes)


def mesh_device_count(mesh_cfg) -> int:
    """Devices the mesh spans: all of them, or the first `mesh.num_devices` (one process only)."""
    wanted = int(mesh_cfg.get("num_devices", 0) or 0)
    if wanted <= 0:
        return jax.device_count()
    if jax.process_count() > 1 or wanted > jax.device_count():
        raise ValueError(
            f"mesh.num_devices={wanted} needs a single process with at least that many devices "
            f"(have {jax.device_count()} devices in {jax.process_count()} processes)"
        )
    return wanted


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """Builds an Auto-typed mesh (linen logical constraints need Auto axes)."""
    if devices is None:
        devices = jax.devices()[: mesh_device_count(mesh_cfg)]
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh, name: str) -> P:
    """Drops mesh axes that do not divide a dimension, so small tensors stay replicated."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if axes is None:
            fitted.append(None)
            continue
        group = axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh.shape[a] for a in group)
        if dim % size:
            logging.debug("replicating dim %d of %s (not divisible by %s)", dim, name, group)
            fitted.append(None)
        else:
            fitted.append(axes)
    return P(*fitted)


def param_shardings(boxed_abstract, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
    """Shardings (unboxed tree) for a tree of possibly LogicallyPartitioned abstract leaves."""
    logical = nn.get_partition_spec(boxed_abstract)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    unboxed = nn.unbox(boxed_abstract)
    flat_specs = jax.tree_util.tree_flatten_with_path(
        mesh_specs, is_leaf=lambda x: isinstance(x, P)
    )[0]
    flat_shapes, treedef = jax.tree_util.tree_flatten(unboxed)
    shardings = []
    for (path, spec), leaf in zip(flat_specs, flat_shapes, strict=True):
        name = jax.tree_util.keystr(path)
        shardings.append(NamedSharding(mesh, _fit_spec(spec, tuple(leaf.shape), mesh, name)))
    return jax.tree_util.tree_unflatten(treedef, shardings)


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def opt_state_shardings(abstract_opt, params_abs, params_sh, mesh: jax.sharding.Mesh):
    """Shardings of an abstract optimiser state, read from its structure.

    Every subtree laid out like the params (Adam's moments; under optax.multi_transform a group
    keeps such a tree with MaskedNode where a param is another group's) takes each param's
    sharding, leaf for leaf, where the shapes agree; every other leaf (step counts, a leaf of
    another shape) is replicated. No names are matched, so no two params can be confused.
    """
    params_def = jax.tree.structure(params_abs)

    def is_param_tree(node) -> bool:
        return jax.tree.structure(node, is_leaf=_is_masked) == params_def

    def like_param(param, param_sharding, leaf):
        if _is_masked(leaf):
            return leaf
        return param_sharding if leaf.shape == param.shape else replicated(mesh)

    def one(node):
        if is_param_tree(node):
            return jax.tree.map(like_param, params_abs, params_sh, node)
        return replicated(mesh)

    return jax.tree.map(one, abstract_opt, is_leaf=is_param_tree)


def global_batch_from_local(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Assembles per-process numpy batches into global arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
