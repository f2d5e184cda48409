"""Write an IsoCLIP-filtered copy of pretrained CLIP weights, for intra-modal retrieval only.

    python -m beta_clip_jax.isoclip_apply --init=hf:PATH --out=DIR --variant=B/16
    python -m beta_clip_jax.isoclip_apply --init=openai:ViT-B-16.pt --out=DIR \
        --image_band=200,50 --text_band=10,50

Each projection is filtered with its own modality's band (methods/isoclip.py, `BANDS`). The
result is meant for image->image and text->text similarity; image<->text scoring must use the
original weights. Writes `DIR/params.msgpack` (flax serialization of the params tree) and
`DIR/isoclip.json` (bands, source, sigma_j / sigma_1 spectrum of Psi).
"""

import json
import os

from absl import app, flags
from flax import serialization

from beta_clip_jax.methods.isoclip import filter_checkpoint

_INIT = flags.DEFINE_string("init", None, "pretrained weights: hf:PATH, openai:PATH or a workdir")
_OUT = flags.DEFINE_string("out", None, "output directory")
_VARIANT = flags.DEFINE_string("variant", None, "backbone for the published bands, e.g. B/16")
_IMAGE_BAND = flags.DEFINE_string("image_band", None, "k_top,k_bottom for the image side")
_TEXT_BAND = flags.DEFINE_string("text_band", None, "k_top,k_bottom for the text side")


def _band(text):
    if text is None:
        return None
    k_top, k_bottom = (int(v) for v in text.split(","))
    return k_top, k_bottom


def _load(init):
    """(params, model config) through the converters that also serve `config.init`."""
    try:
        from beta_clip_jax.convert import load_pretrained
    except ImportError as err:
        raise SystemExit(
            "beta_clip_jax.convert.load_pretrained is not available; it is what reads --init"
        ) from err
    return load_pretrained(init)


def run(init, out, variant=None, image_band=None, text_band=None, load=_load):
    """Load `init`, filter both projections, write params + metadata under `out`.

    `load(init) -> (params, model_cfg)`; the variant defaults to `model_cfg.variant`.
    """
    params, model_cfg = load(init)
    variant = variant or (None if image_band and text_band else model_cfg.get("variant"))
    params, info = filter_checkpoint(params, variant, image_band=image_band, text_band=text_band)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "params.msgpack"), "wb") as f:
        f.write(serialization.msgpack_serialize(params))
    meta = {
        "init": init,
        "variant": variant,
        "model": dict(model_cfg),
        "image_band": list(info["image_band"]),
        "text_band": list(info["text_band"]),
        "spectrum": [float(v) for v in info["spectrum"]],
        "use": "intra-modal only (image->image, text->text)",
    }
    with open(os.path.join(out, "isoclip.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return params, meta


def main(argv):
    del argv
    run(_INIT.value, _OUT.value, _VARIANT.value, _band(_IMAGE_BAND.value), _band(_TEXT_BAND.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["init", "out"])
    app.run(main)
