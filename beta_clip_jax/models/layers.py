"""Transformer pieces shared by both towers: LayerNorm, residual block, stacked (scanned) layers.

Layout follows OpenAI CLIP (pre-LN residual blocks, MHA with biases, a two-layer MLP) so that
pretrained weights map tensor for tensor. The defaults are OpenAI's (QuickGELU, an MLP 4x the
width, LayerNorm eps 1e-5); other members of the CLIP family (LAION's open_clip models, SDXL's
text encoders) set the activation, the MLP width and the eps; none of them changes the parameter
tree. Parameters carry logical axis names; the stacked layers carry an extra leading "layers" axis
whether they are scanned or unrolled, so checkpoints do not depend on `scan_layers`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beta_clip_jax.sharding import LOGICAL_RULES

LN_EPS = 1e-5
_F32 = jnp.float32


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding annotation in logical axis names, mapped to mesh axes by
    sharding.LOGICAL_RULES (activations split over the batch axes). The rules are passed here,
    not through a global nn.logical_axis_rules context: under such a context flax also constrains
    parameter initialisers, and DenseGeneral initialises a flat kernel its 3 names do not fit.
    A no-op outside a mesh."""
    return nn.with_logical_constraint(x, axes, rules=LOGICAL_RULES)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_erf(x: jax.Array) -> jax.Array:
    """The exact GELU x * Phi(x) (torch.nn.GELU(), HF "gelu", open_clip's default)."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU's tanh approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): HF's
    "gelu_new" (NewGELUActivation) and "gelu_pytorch_tanh" (torch's approximate="tanh")."""
    return jax.nn.gelu(x, approximate=True)


# model.activation (Hugging Face's hidden_act names) -> the MLP's activation.
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}


def activation_fn(name: str):
    """The activation called `name` (a key of ACTIVATIONS)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def abstract_params(module: nn.Module, *inputs, boxed: bool = False):
    """The parameters `module.init(key, *inputs)` creates, as jax.ShapeDtypeStructs: nothing is
    allocated or computed. boxed=True keeps the logical axis names, which the shardings read.

    The one shape helper for every module (the model, the train state, the pooler alone)."""
    params = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    return params if boxed else nn.unbox(params)


def logical_init(init, axes: tuple[str | None, ...]):
    """An initialiser whose parameter carries logical axis names for the sharding rules."""
    return nn.with_logical_partitioning(init, axes)


def remat_policy(remat: str):
    """(use_remat, policy) for the config's remat option; "dots" keeps matmul outputs."""
    if remat == "none":
        return False, None
    if remat == "full":
        return True, None
    if remat == "dots":
        return True, jax.checkpoint_policies.checkpoint_dots
    raise ValueError(f"remat must be 'none', 'full' or 'dots', got {remat!r}")


class LayerNorm(nn.Module):
    """LayerNorm (eps 1e-5 unless given), computed in float32 whatever the input dtype."""

    eps: float = LN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        e = x.shape[-1]
        scale = self.param("scale", logical_init(nn.initializers.ones_init(), ("embed",)), (e,))
        bias = self.param("bias", logical_init(nn.initializers.zeros_init(), ("embed",)), (e,))
        x = x.astype(_F32)
        mu = x.mean(-1, keepdims=True)
        var = jnp.square(x - mu).mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + self.eps) * scale + bias


def _heads_proj(name: str, heads: int, head_dim: int, dtype, std: float) -> nn.DenseGeneral:
    """q/k/v projection [E] -> [H, Dh]; head h owns features h*Dh:(h+1)*Dh as in PyTorch."""
    return nn.DenseGeneral(
        (heads, head_dim),
        dtype=dtype,
        param_dtype=_F32,
        kernel_init=logical_init(nn.initializers.normal(std), ("embed", "heads", "kv")),
        bias_init=logical_init(nn.initializers.zeros_init(), ("heads", "kv")),
        name=name,
    )


def attention_implementation(attention: str) -> str | None:
    """model.attention -> jax.nn.dot_product_attention's `implementation` (None: JAX picks)."""
    return None if attention == "auto" else attention


class ResidualBlock(nn.Module):
    """Pre-LN block: x + MHA(LN1 x), then + MLP(LN2 x).

    mode "full": bidirectional attention (vision); "causal": text; "mixed": beta-CLIP's last
    vision block, where the first `num_cls` rows (CLS) attend to all tokens and every other row
    takes the value-only path a_p = W_o (W_v u_p + b_v) + b_o (no token mixing), so patch tokens
    stay local. `attn` (optional, broadcastable to [B, heads, L, L]) is a boolean mask (True =
    may attend) or an additive float bias (a method's attention pattern between CLS rows).
    The MLP is W -> M -> W with M = `mlp_dim` (0: 4W, OpenAI's) and `activation` between (a key
    of ACTIVATIONS); both LayerNorms use `eps`. `mlp_out` builds the MLP's second layer "fc2":
    None is a Dense M -> W; a method may pass its own factory `(features, dtype, std, name) ->
    module` (one that keeps the name "fc2", so pretrained weights still map onto it).
    With `carry=True` the call signature is (x, attn) -> (x, None), the form nn.scan wants.
    """

    width: int
    heads: int
    mode: str = "full"
    dtype: Any = _F32
    carry: bool = False
    num_cls: int = 1
    mlp_out: Any = None
    attention: str = "auto"
    mlp_dim: int = 0
    activation: str = "quick_gelu"
    eps: float = LN_EPS

    @nn.compact
    def __call__(self, x: jax.Array, attn: jax.Array | None = None):
        e, h, cd = self.width, self.heads, self.dtype
        act = activation_fn(self.activation)
        dh = e // h
        std = e**-0.5

        y = LayerNorm(self.eps, name="ln_1")(x)
        q = _heads_proj("query", h, dh, cd, std)(y)
        k = _heads_proj("key", h, dh, cd, std)(y)
        v = _heads_proj("value", h, dh, cd, std)(y)
        mask = bias = None
        if attn is not None:
            mask, bias = (attn, None) if attn.dtype == jnp.bool_ else (None, attn.astype(q.dtype))
        if self.mode == "mixed":
            # Only the CLS queries need real attention; patch rows are their own values.
            n = self.num_cls
            cls_ctx = jax.nn.dot_product_attention(
                q[:, :n],
                k,
                v,
                mask=None if mask is None else mask[..., :n, :],
                bias=None if bias is None else bias[..., :n, :],
                implementation=attention_implementation(self.attention),
            )
            ctx = jnp.concatenate([cls_ctx, v[:, n:]], axis=1)
        elif self.mode in ("full", "causal"):
            ctx = jax.nn.dot_product_attention(
                q,
                k,
                v,
                mask=mask,
                bias=bias,
                is_causal=self.mode == "causal",
                implementation=attention_implementation(self.attention),
            )
        else:
            raise ValueError(f"unknown block mode {self.mode!r}")
        o = nn.DenseGeneral(
            e,
            axis=(-2, -1),
            dtype=cd,
            param_dtype=_F32,
            kernel_init=logical_init(nn.initializers.normal(std), ("heads", "kv", "embed")),
            bias_init=logical_init(nn.initializers.zeros_init(), ("embed",)),
            name="out",
        )(ctx)
        x = x + o.astype(_F32)

        y = LayerNorm(self.eps, name="ln_2")(x)
        y = nn.Dense(
            self.mlp_dim or 4 * e,
            dtype=cd,
            param_dtype=_F32,
            kernel_init=logical_init(nn.initializers.normal((2 * e) ** -0.5), ("embed", "mlp")),
            bias_init=logical_init(nn.initializers.zeros_init(), ("mlp",)),
            name="fc1",
        )(y)
        y = (self.mlp_out or mlp_out_dense)(e, cd, std, "fc2")(act(y))
        x = x + y.astype(_F32)
        x = constrain(x, ("batch", "length", None))
        return (x, None) if self.carry else x


def mlp_out_dense(features: int, dtype: Any, std: float, name: str) -> nn.Dense:
    """The MLP's second layer M -> W, OpenAI's layout (ResidualBlock's default `mlp_out`)."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=_F32,
        kernel_init=logical_init(nn.initializers.normal(std), ("mlp", "embed")),
        bias_init=logical_init(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def block_stack(
    num_layers: int,
    width: int,
    heads: int,
    *,
    mode: str,
    dtype: Any,
    scan_layers: bool,
    remat: str,
    name: str = "blocks",
    mlp_out: Any = None,
    attention: str = "auto",
    mlp_dim: int = 0,
    activation: str = "quick_gelu",
    eps: float = LN_EPS,
):
    """`num_layers` residual blocks with parameters stacked on a leading "layers" axis.

    Always built with nn.scan so the parameter tree is the same in both modes; scan_layers=False
    unrolls the loop fully (no while loop in the compiled program), which can be faster to run
    and slower to compile. Returns a module called as `x, _ = stack(x, attn)` (attn: None or the
    blocks' shared attention mask / bias, see ResidualBlock; `mlp_out` likewise).
    """
    block_cls = ResidualBlock
    use_remat, policy = remat_policy(remat)
    if use_remat:
        # prevent_cse is unnecessary under scan and blocks optimisations there.
        block_cls = nn.remat(ResidualBlock, policy=policy, prevent_cse=not scan_layers)
    scanned = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=num_layers,
        unroll=1 if scan_layers else num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(
        width=width,
        heads=heads,
        mode=mode,
        dtype=dtype,
        carry=True,
        mlp_out=mlp_out,
        attention=attention,
        mlp_dim=mlp_dim,
        activation=activation,
        eps=eps,
        name=name,
    )


def dense_proj(features: int, dtype: Any, std: float, name: str) -> nn.Dense:
    """Bias-free projection into the joint embedding space (OpenAI's visual.proj / text_proj)."""
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=_F32,
        kernel_init=logical_init(nn.initializers.normal(std), ("embed", None)),
        name=name,
    )
