"""IsoCLIP on OpenAI CLIP ViT-B/16: intra-modal retrieval with and without the spectral filter.

    python -m beta_clip_jax.main --config=configs/isoclip_real.py --workdir=runs/isoclip_b16 \
        --config.init=hf:/path/to/clip-vit-base-patch16 \
        --config.evals.cub.image_root=/data/CUB_200_2011/images \
        --config.evals.coco_t2t.json_path=/data/coco/dataset_coco.json

Evaluation only (no training): the plain scores (i2i_*, t2t_*) and the IsoCLIP ones (iso_*)
with B/16's published bands (image 200/50, text 10/50). CUB: query = gallery = all images,
relevant = same class (one folder per class). COCO text->text: Karpathy test split, the first
caption of each image queries the other four. Other image->image sets: add evaluators with
`image_root` (queries, e.g. a test split) and `gallery_root` (e.g. the train split). The model
keeps its 77-position text table so the text tower is exactly OpenAI's.
To write filtered weights instead: `python -m beta_clip_jax.methods.isoclip_apply --init=hf:PATH
--out=DIR --variant=B/16`.
"""

import ml_collections

from beta_clip_jax.config_defaults import base_config


def get_config(variant: str = "B/16"):
    variant = variant or "B/16"
    c = base_config(variant)
    c.mode = "eval"
    c.init = "hf:weights/clip-vit-base-patch16"
    c.model.context_length = 77
    c.evals = ml_collections.ConfigDict()
    c.evals.cub = dict(
        kind="intramodal",
        image_root="data/CUB_200_2011/images",
        iso_variant=variant,
        batch_size=128,
    )
    c.evals.coco_t2t = dict(
        kind="intramodal",
        json_path="data/coco/dataset_coco.json",
        iso_variant=variant,
        batch_size=256,
    )
    return c
