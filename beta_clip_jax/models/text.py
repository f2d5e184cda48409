"""Causal text tower in OpenAI CLIP layout with a long (default 248) positional table.

The first `frozen_positions` rows of the positional table pass through stop_gradient, so they
keep the pretrained short-context positions; the optimizer also masks their updates so weight
decay cannot move them. Any sequence length up to the table size works: positions are sliced.
Texts may also come packed several to a row (data/packing.py); the numbers are the same.
`mlp_dim`, `activation` and `layer_norm_eps` default to OpenAI's (4 x width, QuickGELU, 1e-5).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beta_clip_jax.models.layers import (
    LN_EPS,
    LayerNorm,
    block_stack,
    constrain,
    dense_proj,
    logical_init,
)


class TextTower(nn.Module):
    """tokens int32 [N, L] -> ([N, E], intermediates): the projected hidden state at the first
    EOT (argmax id), and {"token_states": [N, L, W]}, every token's last hidden state after
    ln_final, before the projection (for a method that reads per-token states; under jit an
    unused value costs nothing).
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
    mlp_dim: int = 0
    activation: str = "quick_gelu"
    layer_norm_eps: float = LN_EPS

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        segments: jax.Array | None = None,
        positions: jax.Array | None = None,
        eot: jax.Array | None = None,
    ):
        """Unpacked: tokens [N, L] -> ([N, E], intermediates), each row read at its argmax id.

        Packed (`segments` given; data/packing.py): tokens, segments, positions [G, R, L] hold
        the texts of G groups in R rows each, eot [G, T] each text's flat index in its group's
        R * L tokens -> [G, T, E]. A token attends only to its own text's earlier tokens and
        takes the positional row of its place in that text, so each text computes exactly what
        it computes alone.
        """
        packed = segments is not None
        lead = tokens.shape[:-1]
        tokens = tokens.reshape(-1, tokens.shape[-1])
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
        if packed:
            positions = positions.reshape(n, length)
            pos = jnp.take(pos_table, positions, axis=0)
            if f:  # the frozen rows pass no gradient, wherever they sit in a packed row
                pos = jnp.where((positions < f)[..., None], jax.lax.stop_gradient(pos), pos)
            segments = segments.reshape(n, length)
            attn = (segments[:, None, :, None] == segments[:, None, None, :]) & (
                segments[:, None, None, :] > 0
            )
            attn = attn | jnp.eye(length, dtype=bool)  # a padding token attends to itself
        else:
            pos = pos_table[:length]
            if f:
                pos = jnp.concatenate([jax.lax.stop_gradient(pos[:f]), pos[f:]], axis=0)
            attn = None
        x = jnp.take(tok_table, tokens, axis=0) + pos
        x = constrain(x, ("batch", "length", None))

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
                mlp_dim=self.mlp_dim,
                activation=self.activation,
                eps=self.layer_norm_eps,
            )(x, attn)

        ln_final = LayerNorm(self.layer_norm_eps, name="ln_final")
        proj = dense_proj(self.embed_dim, self.dtype, d**-0.5, "proj")
        intermediates = {"token_states": ln_final(x)}
        if packed:
            # Each text is read at its own EOT; LayerNorm is per token, so after the gather.
            flat = x.reshape(lead[0], -1, d)
            x = jnp.take_along_axis(flat, eot[..., None], axis=1)
            return proj(ln_final(x)).astype(jnp.float32), intermediates
        # EOT (49407) is the largest id, so argmax finds the first EOT even with zero padding;
        # LayerNorm is per token, so applying it after the gather is the same and cheaper.
        eot = jnp.argmax(tokens, axis=-1)
        x = ln_final(jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0])
        return proj(x).astype(jnp.float32), intermediates
