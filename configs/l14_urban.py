"""β-CLIP ViT-L/14 at 224 px on ShareGPT4V long captions: configs/b16_urban.py's recipe (data,
loss, optimiser, schedule, evaluations) with the L/14 towers.

Of the variants, only an L/14 text tower (768 wide) fits Stable Diffusion 1.x, whose UNet
cross-attends to 768-wide text states, so this is the run whose 248-token text encoder can
replace SD 1.x's 77-token one (docs/export.md, Use with diffusers).

Prepare the training JSONL as for B/16 (spaCy phrases; also holds out SV-1k):

    SV=/data/sharegpt4v; JSON=$SV/share-captioner_coco_lcs_sam_1246k_1107_filtered.json
    python -m beta_clip_jax.data.prepare --input=$JSON --format=sharegpt4v \
        --image_root=$SV/images --out=$SV/train_spacy.jsonl --processes=16
    python -m beta_clip_jax.main --config=configs/l14_urban.py --workdir=runs/l14_ce \
        --config.init=openai:/path/to/ViT-L-14.pt \
        --config.data.path=$SV/train_spacy.jsonl --config.data.image_root=$SV/images \
        --config.evals.urban1k.root=/data/Urban1k ...

then export the text encoder for diffusers:

    python -m beta_clip_jax.export --workdir=runs/l14_ce --out=exports/l14_te --text_encoder_only

`configs/l14_urban.py:bce` trains the BCE variant. Weights: OpenAI's ViT-L-14.pt (openai:PATH) or
a local copy of the Hugging Face directory openai/clip-vit-large-patch14 (hf:PATH); positions
are stretched 77 -> 248. The eval paths and where to get each file are as in
configs/b16_urban.py; docs/data.md. L/14 has about 2.8 times B/16's parameters (a vision tower
of 24 layers 1024 wide over 256 patches, against 12 x 768 over 196), so the optimiser batch of
2048 (8 accumulated micro-batches of 256) may need more devices or `--config.optim.grad_accum=16`
or 32 (micro-batches of 128 or 64, still whole β-CAL groups of 64).
"""

from beta_clip_jax.config_presets import urban_recipe


def get_config(arg: str = "ce"):
    c = urban_recipe(arg or "ce")
    # The shape fields are placeholders that the variant fills, so this changes every shape.
    c.model.variant = "L/14"
    c.init = "openai:weights/ViT-L-14.pt"
    return c
