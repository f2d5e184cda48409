"""Causal text tower in OpenAI CLIP layout with a long (default 248) positional table (spec 1.3).

The first `frozen_positions` rows of the positional table pass through stop_gradient, so they
keep the pretrained short-context positions; the optimizer also masks their updates so weight
decay cannot move them. Any sequence length up to the table size works: positions are sliced.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beta_clip_jax.models.layers import LayerNorm, block_stack, dense_proj, logical_init


class TextTower(nn.Module):
    """tokens int32 [N, L] -> [N, E], the projected hidden state at the first EOT (argmax id).

    With `return_tokens=True` -> ([N, E], [N, L, W]): also every token's last hidden state after
    ln_final, before the projection (SmartCLIP's mask head reads them).
    """

    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    frozen_positions: int = 20
    dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array, return_tokens: bool = False):
        n, length = tokens.shape
        if length > self.context_length:
            raise ValueError(
                f"text length {length} exceeds the model's context length {self.context_length}"
            )
        d = self.width
        tok_table = self.param(
            "token_embedding",
            logical_init(nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.vocab_size, d),
        )
        pos_table = self.param(
            "positional_embedding",
            logical_init(nn.initializers.normal(0.01), (None, "embed")),
            (self.context_length, d),
        )
        f = min(self.frozen_positions, length)
        pos = pos_table[:length]
        if f:
            pos = jnp.concatenate([jax.lax.stop_gradient(pos[:f]), pos[f:]], axis=0)
        x = jnp.take(tok_table, tokens, axis=0) + pos
        x = nn.with_logical_constraint(x, ("batch", "length", None))

        if self.layers:
            x, _ = block_stack(
                self.layers,
                d,
                self.heads,
                mode="causal",
                dtype=self.dtype,
                scan_layers=self.scan_layers,
                remat=self.remat,
                attention=self.attention,
            )(x, None)

        # EOT (49407) is the largest id, so argmax finds the first EOT even with zero padding;
        # LayerNorm is per token, so applying it after the gather is the same and cheaper.
        eot = jnp.argmax(tokens, axis=-1)
        ln_final = LayerNorm(name="ln_final")
        states = ln_final(x) if return_tokens else None
        if return_tokens:
            x = jnp.take_along_axis(states, eot[:, None, None], axis=1)[:, 0]
        else:
            x = ln_final(jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0])
        out = dense_proj(self.embed_dim, self.dtype, d**-0.5, "proj")(x).astype(jnp.float32)
        return (out, states) if return_tokens else out
