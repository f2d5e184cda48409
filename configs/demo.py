"""Demo: β-CLIP vs plain CLIP from scratch on the synthetic scenes, minutes on a CPU (draft).

python -m beta_clip_jax.main --config=configs/demo.py --workdir=runs/demo        # β-CLIP CE
python -m beta_clip_jax.main --config=configs/demo.py:clip --workdir=runs/clip   # plain CLIP
"""

from beta_clip_jax.config_defaults import base_config

METHODS = ("ce", "bce", "clip")


def get_config(method: str = "ce"):
    method = method or "ce"
    if method not in METHODS:
        raise ValueError(f"configs/demo.py:METHOD with METHOD in {METHODS}, got {method!r}")
    c = base_config("tiny")
    c.model.image_size = 64
    c.model.patch_size = 8
    c.model.frozen_positions = 0
    c.data.name = "synthetic"
    c.data.synthetic.num_train = 65536
    c.data.synthetic.max_objects = 3
    c.data.max_sentences = 3
    c.data.max_phrases = 4
    c.data.text_length = 36
    c.data.phrase_length = 12
    c.data.crop_scale = (1.0, 1.0)
    c.data.crop_ratio = (1.0, 1.0)
    c.batch_size = 32
    c.loss.group_size = 32
    c.loss.name = "clip" if method == "clip" else "beta_clip"
    c.loss.mode = "bce" if method == "bce" else "ce"
    c.num_steps = 300
    c.log_every = 25
    c.checkpoint_every = 1000
    c.optim.lr = 2e-3
    c.optim.final_lr = 1e-5
    c.optim.warmup_steps = 50
    c.optim.pooler_lr = 1e-2
    c.optim.pooler_final_lr = 1e-4
    c.mesh.num_devices = 1
    c.evals.synthetic = dict(
        kind="synthetic", num_examples=128, every=150, batch_size=64, min_objects=2, max_objects=3
    )
    return c
