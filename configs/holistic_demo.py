"""Holistic CLIP on the synthetic scenes: configs/demo.py's settings, K image branches, M2M loss.

    python -m beta_clip_jax.main --config=configs/holistic_demo.py --workdir=/tmp/demo_holistic
    python -m beta_clip_jax.main --config=configs/holistic_demo.py:mlp --workdir=/tmp/demo_hmlp

K = M = 1 + data.max_sentences: the caption and its sentences are the M texts of an image,
branch k is paired with text slot k (loss.holistic.pairing="auto", the released rule), plus the
0.7 diversity hinge. "cls" (default) is the multi-class-token encoder, "mlp" the branched-fc2
encoder in the last model.branch_layers blocks. Evaluation embeds images with the mean of the
branches (model.encode_image fuses them).
"""

from beta_clip_jax.config_presets import demo_recipe, tiny_intra_eval


def get_config(branch_type: str = "cls"):
    branch_type = branch_type or "cls"
    if branch_type not in ("cls", "mlp"):
        raise ValueError(f"configs/holistic_demo.py:TYPE, TYPE in cls, mlp; got {branch_type!r}")
    c = demo_recipe("clip")
    c.data.pack_texts = False  # the method reads per-text token states (docs/data.md)
    c.method = "holistic"  # the model gets its parts, the loss is its own
    c.loss.name = ""  # the demo base names "clip" there; "" follows config.method
    c.model.image_branches = 1 + c.data.max_sentences
    c.model.branch_type = branch_type
    c.model.branch_layers = 1  # the tiny ViT has 2 blocks; the paper branches 3 of 12
    c.loss.holistic.pairing = "auto"
    c.loss.holistic.diversity_margin = 0.7
    c.data.max_phrases = 0
    c.evals.intra = tiny_intra_eval(every=c.evals.synthetic.every)
    return c
