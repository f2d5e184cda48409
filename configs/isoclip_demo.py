"""IsoCLIP on the synthetic scenes: evaluate a trained workdir, with and without the filter.

    python -m beta_clip_jax.main --config=configs/isoclip_demo.py:/tmp/demo_ce \
        --workdir=/tmp/demo_ce_iso

IsoCLIP needs no training. This evaluation-only config (mode="eval", init = the source
workdir) copies the source run's model and data settings from its config.json and runs the
synthetic benchmark plus the intra-modal evaluator (image->image by scene, text->text by
scene), reporting plain and IsoCLIP-filtered (iso_*) scores side by side; numbers land in
WORKDIR/metrics.jsonl and eval_results.json. The filter is applied in memory; to write
filtered weights instead:

    python -m beta_clip_jax.methods.isoclip_apply --init=/tmp/demo_ce --out=/tmp/demo_ce_isoclip \
        --image_band=12,35 --text_band=1,35
"""

import json
import os

import ml_collections

from beta_clip_jax.config_presets import demo_recipe, tiny_intra_eval


def get_config(source: str = ""):
    c = demo_recipe("clip")
    c.mode = "eval"
    c.init = source
    if source:
        with open(os.path.join(source, "config.json")) as f:
            trained = json.load(f)
        c.model = ml_collections.ConfigDict(trained["model"])
        c.data = ml_collections.ConfigDict(trained["data"])
        c.loss = ml_collections.ConfigDict(trained["loss"])
    c.evals.intra = tiny_intra_eval()
    c.evals.synthetic.every = 0
    return c
