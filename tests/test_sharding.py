"""Mesh sizes from the config, and parameter shardings that always fit their tensors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from beta_clip_jax import sharding


def _mesh_cfg(**sizes):
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, **sizes})


def test_mesh_shape_fills_minus_one():
    assert sharding.mesh_shape(_mesh_cfg(), 8) == (8, 1, 1)
    assert sharding.mesh_shape(_mesh_cfg(fsdp=4), 8) == (2, 4, 1)
    assert sharding.mesh_shape(_mesh_cfg(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2)


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(fsdp=3), "not a multiple of 3"),
        (dict(data=2, fsdp=2, tensor=1), "multiplies to 4, but there are 8"),
        (dict(data=-1, fsdp=-1), "at most one axis"),
    ],
)
def test_mesh_shape_rejects_with_numbers(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(_mesh_cfg(**sizes), 8)


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp"))
        w = self.param("w", init, (8, 6))
        b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (3,))
        return x @ w + b.sum()


def test_fsdp_shards_embed_and_replicates_indivisible_dims():
    mesh = sharding.make_mesh(_mesh_cfg(data=2, fsdp=4))
    boxed = jax.eval_shape(lambda: _Tiny().init(jax.random.key(0), jnp.ones((2, 8)))["params"])
    sh = sharding.param_shardings(boxed, mesh)
    assert sh["w"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # 3 is not divisible by fsdp=4: that dimension stays replicated instead of failing in XLA.
    assert sh["b"].spec == jax.sharding.PartitionSpec(None)


def test_opt_state_shardings_follow_the_params_by_structure():
    """Moments take their param's sharding leaf for leaf, also inside a multi_transform group
    that masks the other group's params; counts are replicated. Two params named alike ("w")
    at different depths with different shardings cannot be confused."""
    import optax

    mesh = sharding.make_mesh(_mesh_cfg(data=2, fsdp=4))
    p = jax.sharding.PartitionSpec
    params = {
        "w": jax.ShapeDtypeStruct((8, 6), jnp.float32),
        "pooler": {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32)},
    }
    params_sh = {
        "w": jax.sharding.NamedSharding(mesh, p("fsdp", None)),
        "pooler": {"w": jax.sharding.NamedSharding(mesh, p(None, "tensor"))},
    }
    labels = {"w": "main", "pooler": {"w": "pooler"}}
    tx = optax.multi_transform({"main": optax.adam(1e-3), "pooler": optax.adam(1e-2)}, labels)
    abstract = jax.eval_shape(tx.init, params)
    got = sharding.opt_state_shardings(abstract, params, params_sh, mesh)
    main = got.inner_states["main"].inner_state[0]
    pooler = got.inner_states["pooler"].inner_state[0]
    assert main.mu["w"] == main.nu["w"] == params_sh["w"]
    assert pooler.mu["pooler"]["w"] == params_sh["pooler"]["w"]
    assert isinstance(main.mu["pooler"]["w"], optax.MaskedNode)
    assert main.count == pooler.count == sharding.replicated(mesh)
