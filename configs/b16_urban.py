"""β-CLIP ViT-B/16 on ShareGPT4V long captions, evaluated on Urban1K, SV-1k and FG-OVD.

First precompute sentences and spaCy phrases (once; needs `pip install spacy` and the
en_core_web_sm model package). This also holds out SV-1k, the json's first 1000 entries:

    SV=/data/sharegpt4v; JSON=$SV/share-captioner_coco_lcs_sam_1246k_1107_filtered.json
    python -m beta_clip_jax.data.prepare --input=$JSON --format=sharegpt4v \
        --image_root=$SV/images --out=$SV/train_spacy.jsonl --processes=16

Then train on the JSONL:

    python -m beta_clip_jax.main --config=configs/b16_urban.py --workdir=runs/b16_ce \
        --config.init=openai:/path/to/ViT-B-16.pt \
        --config.data.path=$SV/train_spacy.jsonl --config.data.image_root=$SV/images \
        --config.evals.urban1k.root=/data/Urban1k \
        --config.evals.sv1k.json_path=$JSON --config.evals.sv1k.image_root=$SV/images \
        --config.evals.fgovd.root=/data/fgovd --config.evals.fgovd.image_root=/data/coco

`configs/b16_urban.py:bce` trains the BCE variant (the Urban1K headline row, 91.8 / 92.3 R@1 in the
paper); the default CE variant is the FG-OVD-hard row (30.9). Everything else follows the released
scripts: AdamW (0.9, 0.98), 10 epochs, optimiser batch 2048 made of 8 accumulated micro-batches of
256, β-CAL over groups of 64 images with K = 1 + 5 + 30 texts, the global CLS-caption InfoNCE over
each micro-batch of 256 with the 4-GPU recipe's gradient (loss.global_gradient "local": columns
carry no gradient), towers lr 1e-5 with ~0.1% warm-up and cosine to 1e-7, pooler lr 1e-3 cosine
to 1e-4.

Where to get the files:
* weights: OpenAI's ViT-B-16.pt (openai:PATH) or a Hugging Face CLIP directory such as
  openai/clip-vit-base-patch16 saved locally (hf:PATH); positions are stretched 77 -> 248.
* captions: share-captioner_coco_lcs_sam_1246k_1107_filtered.json, the ShareGPT4V caption file
  as filtered by the β-CLIP authors (Detoxify on the text, an NSFW image classifier on the
  images), from the Google Drive link in their repository's DATA.md (github fzohra/B-CLIP).
  Images: COCO train2017, LLaVA LCS-558K and SAM tars 000000-000050 under image_root.
* SV-1k is that json's first 1000 entries, held out once: prepare skips them (the JSONL has no
  SV-1k entry, so data.skip_first stays None = 0 for jsonl). Training on the json directly
  (--config.data.name=sharegpt4v --config.data.path=$JSON) skips them in the pipeline instead
  (None = 1000 for sharegpt4v), with the phrases from the fallback extractor. docs/data.md.
* Urban1K: HF BeichenZhang/Urban1k (image/ and caption/). FG-OVD: FG-CLIP's *_llava.jsonl files
  with COCO images.
A missing file stops the run before anything compiles, naming each path to set.
"""

from beta_clip_jax.config_presets import urban_recipe


def get_config(arg: str = "ce"):
    return urban_recipe(arg)
