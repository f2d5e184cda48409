"""Holistic CLIP ViT-B/16 from scratch on (image, multi-texts) JSONL, as the released recipe.

    python -m beta_clip_jax.main --config=configs/holistic_real.py --workdir=runs/b16_holistic \
        --config.data.path=/data/cc3m_multi.jsonl --config.data.image_root=/data/cc3m \
        --config.evals.coco.root=/data/coco --config.evals.flickr30k.root=/data/flickr30k \
        --config.evals.imagenet.root=/data/imagenet/val
    ... configs/holistic_real.py:mlp   (the branched-MLP encoder in the last 3 blocks)

Data: our JSONL with the M texts of an image as "sentences" in a FIXED order, e.g.
`{"image": "x.jpg", "caption": "<web caption>", "sentences": ["<web caption>", "<detailed>",
"<nouns>", "<background>", "<main object>"]}` (the paper's M = 5 texts per image).
data.max_sentences is M + 1 so that the M texts keep their order (with exactly max_sentences
texts the hierarchy samples them in random order); slot 0 is then their ". "-joined
concatenation, slots 1..M the texts, slot M+1 padding. K = M + 1 branches pair with the slots
one-to-one (loss.holistic.pairing "auto").
Recipe (the released train.sh): global batch 2048, lr 5e-4, 2000 warm-up steps, cosine, weight
decay 0.2, AdamW (0.9, 0.98, eps 1e-6), 100 epochs, 77-token text, no pretrained weights.
Evaluation fuses the branches (mean) for COCO / Flickr30k retrieval and ImageNet zero-shot.
"""

import ml_collections

from beta_clip_jax.config_defaults import base_config

NUM_TEXTS = 5  # M


def get_config(branch_type: str = "cls"):
    branch_type = branch_type or "cls"
    c = base_config("B/16")
    c.data.pack_texts = False  # the method reads per-text token states (docs/data.md)
    c.init = ""
    c.model.context_length = 77
    c.model.frozen_positions = 0
    c.model.dtype = "bfloat16"
    c.method = "holistic"  # the model gets its parts, the loss is its own
    c.model.image_branches = NUM_TEXTS + 1
    c.model.branch_type = branch_type
    c.model.branch_layers = 3

    c.data.name = "jsonl"
    c.data.path = "data/cc3m_multi.jsonl"
    c.data.image_root = "data/cc3m"
    c.data.max_sentences = NUM_TEXTS + 1
    c.data.max_phrases = 0
    c.data.text_length = 77
    c.data.num_workers = 8

    c.loss.holistic.pairing = "auto"
    c.loss.holistic.diversity_margin = 0.7

    c.batch_size = 2048
    c.num_epochs = 100.0
    c.optim.lr = 5e-4
    c.optim.final_lr = 0.0
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.2
    c.optim.eps = 1e-6

    c.log_every = 50
    c.checkpoint_every = 1000
    every = 5000
    c.evals = ml_collections.ConfigDict()
    # The CLIP-benchmark tables report the Karpathy COCO 5k test and the Flickr30k 1k test.
    c.evals.coco = dict(
        kind="coco", protocol="karpathy", root="data/coco", every=every, batch_size=128
    )
    c.evals.flickr30k = dict(kind="flickr30k", root="data/flickr30k", every=every, batch_size=128)
    # ImageNet val sorted into its synset folders (val/n01440764/*.JPEG): the folders map to
    # CLIP's ImageNet-1k class names with the 80 OpenAI templates (evals/imagenet_classes.py).
    # templates="openai7" embeds 7 prompts per class instead of 80 (cheaper evaluations).
    c.evals.imagenet = dict(
        kind="zeroshot", root="data/imagenet/val", templates="openai80", every=every, batch_size=128
    )
    return c
