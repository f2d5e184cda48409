"""SmartCLIP on the synthetic scenes: configs/demo.py's model, data and schedule, SmartCLIP loss.

    python -m beta_clip_jax.main --config=configs/smartclip_demo.py --workdir=/tmp/demo_smartclip

The model gets SmartCLIP's mask head (model.method="smartclip"), trained in the head group at
optim.pooler_lr after optim.mask_delay_steps of plain CLIP training; the loss is the modular
contrastive + sparsity loss over the caption and its sentences (loss.name="smartclip", weights
in loss.smartclip). Phrases are not used, so none are tokenised. Evaluates the synthetic
benchmark and, beside it, intra-modal retrieval with and without the IsoCLIP filter
(evals.intra; bands for the tiny model, see docs/methods.md).
"""

import importlib.util
import os


def demo_config(method: str = "clip"):
    """configs/demo.py's config, loaded by path (config files are not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("beta_clip_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(method)


# IsoCLIP bands for the tiny model (embed 32, towers 64 wide): Psi is 64 x 64 of rank 32, so
# each k_bottom includes its 32 zero directions; the rest is B/16's published band scaled to
# rank 32 (image 200/50 -> 12/3, text 10/50 -> 1/3 of 512).
TINY_ISO_IMAGE_BAND = (12, 35)
TINY_ISO_TEXT_BAND = (1, 35)


def intra_eval(every: int = 0) -> dict:
    """The synthetic intra-modal evaluator with the tiny model's IsoCLIP bands."""
    return dict(
        kind="intramodal",
        every=every,
        batch_size=64,
        iso_image_band=TINY_ISO_IMAGE_BAND,
        iso_text_band=TINY_ISO_TEXT_BAND,
    )


def get_config():
    c = demo_config("clip")
    c.data.pack_texts = False  # the method reads per-text token states (docs/data.md)
    c.model.method = "smartclip"
    c.loss.name = "smartclip"
    c.loss.smartclip.align_weight = 0.5
    c.loss.smartclip.sparse_weight = 0.1
    c.data.max_phrases = 0
    # SmartCLIP fine-tunes a trained CLIP; from scratch, masks that sparsify while the
    # embeddings are still random collapse to a dim or two and training stalls. So the mask head
    # is held (all-ones masks: exactly the CLIP loss) for the first third of the run.
    c.optim.mask_delay_steps = c.num_steps // 3
    c.evals.intra = intra_eval(every=c.evals.synthetic.every)
    return c
