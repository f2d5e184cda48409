"""SmartCLIP ViT-B/16 fine-tuned from OpenAI CLIP on ShareGPT4V, evaluated on Urban1K and SV-1k.

    SV=/data/sharegpt4v; JSON=$SV/share-captioner_coco_lcs_sam_1246k_1107.json
    python -m beta_clip_jax.main --config=configs/smartclip_real.py --workdir=runs/b16_smartclip \
        --config.init=openai:/path/to/ViT-B-16.pt \
        --config.data.path=$JSON --config.data.image_root=$SV/images \
        --config.evals.urban1k.root=/data/Urban1k \
        --config.evals.sv1k.json_path=$JSON --config.evals.sv1k.image_root=$SV/images

Recipe (SmartCLIP's published setup, Long-CLIP's where SmartCLIP's is unknown): batch 1024 (4
micro-batches of 256), AdamW (0.9, 0.999, eps 1e-8), weight decay 0.01, towers lr 1e-6 with 200
warm-up steps, mask head lr 1e-3 (the head group: optim.pooler_lr), 6 epochs, 248-token text
(positions stretched from 77). The texts of an image are its caption and up to 5 of its
sentences (loss.smartclip: align 0.5, sparsity 0.1, to be swept; watch
train/smartclip_mask_density). Files: see configs/b16_urban.py.

Initialising a SmartCLIP model from plain CLIP weights needs the mask head added to the loaded
tree: `methods.complete_params(params, model)`, called where `config.init` is loaded
(train.load_init_params); see docs/methods.md.
"""

from beta_clip_jax.config_defaults import base_config
from beta_clip_jax.config_presets import long_caption_evals

SHAREGPT4V_JSON = "data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json"
SHAREGPT4V_IMAGES = "data/sharegpt4v/images"


def get_config():
    c = base_config("B/16")
    c.data.pack_texts = False  # the method reads per-text token states (docs/data.md)
    c.init = "openai:weights/ViT-B-16.pt"
    c.method = "smartclip"  # the model gets its parts, the loss is its own
    c.model.dtype = "bfloat16"
    c.model.remat = "full"

    c.data.name = "sharegpt4v"
    c.data.path = SHAREGPT4V_JSON
    c.data.image_root = SHAREGPT4V_IMAGES
    c.data.skip_first = 1000
    c.data.num_workers = 8
    c.data.max_sentences = 5
    c.data.max_phrases = 0

    c.loss.smartclip.align_weight = 0.5
    c.loss.smartclip.sparse_weight = 0.1

    c.batch_size = 1024
    c.optim.grad_accum = 4
    c.num_epochs = 6.0
    c.optim.lr = 1e-6
    c.optim.final_lr = 0.0
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.01
    c.optim.b2 = 0.999
    c.optim.pooler_lr = 1e-3
    c.optim.pooler_final_lr = 1e-4

    c.log_every = 20
    c.checkpoint_every = 500
    every = 1000
    c.evals = long_caption_evals(every, sv1k_json=SHAREGPT4V_JSON)
    return c
