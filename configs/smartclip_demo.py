"""SmartCLIP on the synthetic scenes: configs/demo.py's model, data and schedule, SmartCLIP loss.

    python -m beta_clip_jax.main --config=configs/smartclip_demo.py --workdir=/tmp/demo_smartclip

The model gets SmartCLIP's mask head (config.method="smartclip"), trained in the head group at
optim.pooler_lr after optim.mask_delay_steps of plain CLIP training; the loss is the modular
contrastive + sparsity loss over the caption and its sentences (weights
in loss.smartclip). Phrases are not used, so none are tokenised. Evaluates the synthetic
benchmark and, beside it, intra-modal retrieval with and without the IsoCLIP filter
(evals.intra; bands for the tiny model, see docs/methods.md).
"""

from beta_clip_jax.config_presets import demo_recipe, tiny_intra_eval


def get_config():
    c = demo_recipe("clip")
    c.data.pack_texts = False  # the method reads per-text token states (docs/data.md)
    c.method = "smartclip"  # the model gets its parts, the loss is its own
    c.loss.name = ""  # the demo base names "clip" there; "" follows config.method
    c.loss.smartclip.align_weight = 0.5
    c.loss.smartclip.sparse_weight = 0.1
    c.data.max_phrases = 0
    # SmartCLIP fine-tunes a trained CLIP; from scratch, masks that sparsify while the
    # embeddings are still random collapse to a dim or two and training stalls. So the mask head
    # is held (all-ones masks: exactly the CLIP loss) for the first third of the run.
    c.optim.mask_delay_steps = c.num_steps // 3
    c.evals.intra = tiny_intra_eval(every=c.evals.synthetic.every)
    return c
