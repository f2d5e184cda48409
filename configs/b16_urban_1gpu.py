"""β-CLIP ViT-B/16 on one GPU: the official 1-GPU script's batch (64 images x 8 accumulated).

    python -m beta_clip_jax.main --config=configs/b16_urban_1gpu.py --workdir=runs/b16_1gpu \
        --config.init=openai:/path/to/ViT-B-16.pt \
        --config.data.path=$SV/train_spacy.jsonl --config.data.image_root=$SV/images \
        --config.evals.urban1k.root=/data/Urban1k ...

(`:bce` for the BCE variant; data preparation and eval paths as in configs/b16_urban.py.) What
differs from the released 4-GPU recipe is what the official `train_CE.sh` / `train_BCE.sh`
(torchrun --nproc_per_node=1) change: an optimiser batch of 512 = 8 accumulated micro-batches of
64, so β-CAL runs over each micro-batch (one group of 64) and the global InfoNCE over the same 64,
with the full gradient (a single process gathers nothing, so its columns keep their gradient:
loss.global_gradient "full"). Ten epochs are then ~24k optimiser steps instead of ~6k.

Sized for one 24-40 GB GPU in bfloat16 with packed texts and `model.remat="full"`. Peak memory
of the whole accumulated step, as XLA's memory analysis of its compile estimates it (arguments +
temporaries: f32 params and AdamW state 1.78 GiB, the rest activations of one micro-batch of 64
with 589 text tokens computed per image on ShareGPT4V-like lengths; the bench's Setup, compiled
on this project's CPU, since no GPU was available; a GPU compile differs somewhat):

    remat  "full" 8.4 GiB   "dots" 24.3 GiB   "none" 53.7 GiB

so "full" (the default here, as the reference checkpoints its text tower) fits a 24 GB card and
"dots" (fewer recomputed FLOPs) a 40 GB one: `--config.model.remat=dots`.
Time per step on a GPU has not been measured (no GPU was available to this project); measure
yours with `python -m beta_clip_jax.bench --config=configs/b16_urban_1gpu.py --lengths=sharegpt4v
--config.batch_size=64 --config.optim.grad_accum=1` (one micro-batch; a step is 8 of them).
"""

from beta_clip_jax.config_presets import urban_recipe


def get_config(arg: str = "ce"):
    c = urban_recipe(arg or "ce")
    c.batch_size = 512
    c.optim.grad_accum = 8  # micro-batches of 64, as --batch-size 64 --update-freq 8
    c.loss.group_size = 64
    c.loss.global_gradient = "full"  # one process: nothing is gathered, every logit has grad
    c.data.num_workers = 6
    c.log_every = 50
    c.checkpoint_every = 1000
    every = 2400  # about one epoch at 512 images per step
    for name in c.evals:
        c.evals[name].every = every
    return c
