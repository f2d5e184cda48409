"""Write an IsoCLIP-filtered copy of CLIP weights, for intra-modal retrieval only.

    python -m beta_clip_jax.methods.isoclip_apply --init=hf:PATH --out=DIR --variant=B/16
    python -m beta_clip_jax.methods.isoclip_apply --init=openai:ViT-B-16.pt --out=DIR \
        --image_band=200,50 --text_band=10,50
    python -m beta_clip_jax.methods.isoclip_apply --init=WORKDIR --out=DIR \
        --image_band=12,35 --text_band=1,35

Each projection is filtered with its own modality's band (methods/isoclip.py, `BANDS`; a
`--variant` names a published band, explicit bands override it). The result is meant for
image->image and text->text similarity; image<->text scoring must use the original weights.

DIR receives:
- an export (the layout of beta_clip_jax/convert/export.py: Hugging Face CLIPModel files,
  pooler, meta) that
  `api.load(DIR)`, `--config.init=hf:DIR` and `transformers.CLIPModel.from_pretrained(DIR)` read,
  whenever the model fits that layout (SmartCLIP's training-only mask head is dropped; a
  multi-branch Holistic model does not fit: use the intramodal evaluator's in-memory
  `iso_*_band` options for it instead);
- `params.msgpack`: the whole filtered Flax tree (flax serialization), always;
- `isoclip.json`: source, bands, sigma_j / sigma_1 spectrum of Psi, whether the export was
  written (and why not), and the intended use.

A source without pooler weights (plain CLIP) gets a freshly initialised pooler in the export.
"""

import json
import logging
import os

from flax import serialization

from beta_clip_jax.methods.isoclip import filter_checkpoint

_log = logging.getLogger(__name__)


def _band(text):
    if text is None:
        return None
    k_top, k_bottom = (int(v) for v in text.split(","))
    return k_top, k_bottom


def _load(init):
    """(params, model config) through the converters that also serve `config.init`."""
    from beta_clip_jax.convert import load_pretrained

    return load_pretrained(init)


def _export(params, model_cfg, out, init):
    """Writes the export layout into `out`; returns None or why it could not."""
    try:
        from beta_clip_jax.convert.export import export_params
        from beta_clip_jax.methods import inference_params

        params, cfg = inference_params(params, model_cfg)
        export_params(params, cfg, out, source=f"isoclip_apply {init}")
    except (ValueError, KeyError, TypeError) as err:
        _log.warning("no Hugging Face export in %s (%s); params.msgpack only", out, err)
        return str(err)
    return None


def run(init, out, variant=None, image_band=None, text_band=None, load=_load):
    """Load `init`, filter both projections, write the export, params and metadata to `out`.

    `load(init) -> (params, model_cfg)`; the variant defaults to `model_cfg.variant`.
    """
    params, model_cfg = load(init)
    variant = variant or (None if image_band and text_band else model_cfg.get("variant"))
    params, info = filter_checkpoint(params, variant, image_band=image_band, text_band=text_band)
    os.makedirs(out, exist_ok=True)
    not_exported = _export(params, model_cfg, out, init)
    with open(os.path.join(out, "params.msgpack"), "wb") as f:
        f.write(serialization.msgpack_serialize(params))
    meta = {
        "init": init,
        "variant": variant,
        "model": dict(model_cfg),
        "image_band": list(info["image_band"]),
        "text_band": list(info["text_band"]),
        "spectrum": [float(v) for v in info["spectrum"]],
        "export": not_exported is None,
        "export_error": not_exported,
        "use": "intra-modal only (image->image, text->text); keep the original weights for "
        "image<->text scoring",
    }
    with open(os.path.join(out, "isoclip.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    return params, meta


def _define_flags():
    from absl import flags

    flags.DEFINE_string("init", None, "weights: hf:PATH, openai:PATH or a training workdir")
    flags.DEFINE_string("out", None, "output directory")
    flags.DEFINE_string("variant", None, "backbone of the published bands, e.g. B/16")
    flags.DEFINE_string("image_band", None, "k_top,k_bottom for the image side")
    flags.DEFINE_string("text_band", None, "k_top,k_bottom for the text side")
    flags.mark_flags_as_required(["init", "out"])


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    f = flags.FLAGS
    _, meta = run(f.init, f.out, f.variant, _band(f.image_band), _band(f.text_band))
    done = "export + params.msgpack" if meta["export"] else "params.msgpack only"
    print(
        f"IsoCLIP image band {meta['image_band']}, text band {meta['text_band']}: "
        f"wrote {done} to {f.out}"
    )


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
