"""β-CLIP ViT-B/16, BCE variant (the paper's Urban1K row): configs/b16_urban.py with mode "bce".

Prepare the training JSONL first (spaCy phrases; also holds out SV-1k, the json's first 1000):

    SV=/data/sharegpt4v; JSON=$SV/share-captioner_coco_lcs_sam_1246k_1107_filtered.json
    python -m beta_clip_jax.data.prepare --input=$JSON --format=sharegpt4v \
        --image_root=$SV/images --out=$SV/train_spacy.jsonl --processes=16
    python -m beta_clip_jax.main --config=configs/b16_urban_bce.py --workdir=runs/b16_bce \
        --config.init=openai:/path/to/ViT-B-16.pt \
        --config.data.path=$SV/train_spacy.jsonl --config.data.image_root=$SV/images ...

The eval paths and where to get each file are as in configs/b16_urban.py; docs/data.md.
"""

from beta_clip_jax.config_presets import urban_recipe


def get_config(arg: str = "bce"):
    return urban_recipe(arg or "bce")
