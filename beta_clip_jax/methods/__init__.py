"""The training methods, one module each, and the registry that holds them (registry.py).

- `beta_clip`: global InfoNCE + β-CAL through the text-conditioned pooler (the default).
- `clip`: the global InfoNCE alone (the plain fine-tuning baseline).
- `siglip`: the pairwise sigmoid loss with a learned bias.
- `smartclip`: caption-conditioned mask head and the modular contrastive loss.
- `holistic`: multi-branch image heads, the multi-to-multi loss, branch fusion.

Importing this package registers them, and `isoclip`: training-free spectral filtering of the
projections, registered as a parameter filter (the intra-modal evaluator reports its scores;
its `isoclip_apply` command writes filtered weights) rather than a training method.
"""

from beta_clip_jax.methods import beta_clip, clip, holistic, isoclip, siglip, smartclip  # noqa: F401
from beta_clip_jax.methods.registry import (  # noqa: F401
    LockLayout,
    Method,
    ParamFilter,
    all_methods,
    build_model,
    complete_params,
    get_method,
    head_subtrees,
    inference_params,
    method_names,
    method_of,
    model_config,
    model_defaults,
    param_filters,
    register,
    register_filter,
    resolve_model_config,
    unregister,
)
