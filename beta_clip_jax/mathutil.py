"""Array helpers shared by the model, the inference API and the evaluators.

Kept free of flax and of the rest of the package, so the numpy-only evaluators and plots can
import it without pulling in a model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

L2_EPS = 1e-12


def l2_normalize(x, eps: float = L2_EPS, dtype=np.float32):
    """x / max(||x||, eps) along the last axis, computed in `dtype` (float32: the norm of bf16
    vectors loses too many bits). A jax array (or tracer) gives a jax array; anything else is
    taken as numpy and gives numpy, so the evaluators stay on the host."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x, dtype)
    return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), eps)
