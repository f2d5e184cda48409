"""β-CLIP ViT-B/16 on your own image-caption JSONL, scored on a held-out part of it.

    python -m beta_clip_jax.data.prepare --format=jsonl --input=my_data/captions.jsonl \
        --out=my_data/train.jsonl                # checks every image, adds sentences / phrases
    python -m beta_clip_jax.main --config=configs/own_data.py --workdir=runs/mine \
        --config.data.path=my_data/train.jsonl --config.init=openai:/weights/ViT-B-16.pt
    python -m beta_clip_jax.evaluate --model=runs/mine --eval=jsonl \
        --root=my_data/train.jsonl --set=eval_fraction=0.05

The JSONL has one {"image": "relative/path.jpg", "caption": "..."} per line, paths relative to
the file's folder (or data.image_root); docs/data.md has the fields and what prepare checks. The
last data.eval_fraction of the records is never trained on; the `held_out` evaluator scores
exactly those (long-caption retrieval, dual-encoder and text-conditioned) every `every` steps
and at the end. The β-CLIP recipe otherwise (CE, β = 0.5, K = 1 + 5 + 30, the two learning
rates), with a batch a single GPU holds; raise batch_size and num_epochs for more data.
"""

from beta_clip_jax.config_defaults import base_config


def get_config():
    c = base_config("B/16")
    c.init = "openai:weights/ViT-B-16.pt"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.data.name = "jsonl"
    c.data.path = "my_data/train.jsonl"
    c.data.eval_fraction = 0.05
    c.batch_size = 64
    c.loss.group_size = 64
    c.num_epochs = 5.0
    c.log_every = 10
    c.checkpoint_every = 200
    c.evals.held_out = dict(
        kind="jsonl",
        path=c.data.get_ref("path"),
        eval_fraction=c.data.get_ref("eval_fraction"),
        every=200,
        batch_size=64,
    )
    return c
