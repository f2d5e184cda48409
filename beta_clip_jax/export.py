"""python -m beta_clip_jax.export --workdir=DIR --out=OUT [--step=N]: a checkpoint for PyTorch.

OUT becomes a Hugging Face CLIP directory that `transformers.CLIPModel.from_pretrained(OUT)`,
`CLIPTokenizer` and `CLIPProcessor` load, plus what CLIPModel has no place for:

- config.json, model.safetensors: the two towers, both projections and the global logit_scale;
- vocab.json, merges.txt, tokenizer_config.json, preprocessor_config.json: tokenizer and images;
- beta_clip_pooler.safetensors: the pooler and its logit_scale under our Flax names
  ("pooler/query/kernel", ...), which `api.load(OUT)` reads back and
  `beta_clip_jax.torch_pooler` maps to PyTorch;
- beta_clip_meta.json: variant, model config, tokenizer, context length, step, training config,
  export time and package version.

The weights go through the same name table (convert/names.py) as imports, so the two directions
cannot drift. Nothing here imports torch.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Mapping
from importlib import metadata

from beta_clip_jax.convert import META_FILE, POOLER_FILE
from beta_clip_jax.convert.hf import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    hf_config_from_variant,
    hf_preprocessor_config,
    write_hf_dir,
)
from beta_clip_jax.convert.names import flax_to_hf_state_dict, pooler_file_tensors, table_paths
from beta_clip_jax.models.clip import inference_params
from beta_clip_jax.tokenizer import EOT, SOT, VOCAB_SIZE, Tokenizer

FORMAT = "beta_clip_jax export"
FORMAT_VERSION = 1
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, POOLER_FILE, META_FILE, PREPROCESSOR_FILE)
EXPORT_FILES += TOKENIZER_FILES

_log = logging.getLogger(__name__)


def package_version() -> str:
    """The installed beta_clip_jax version ("unknown" when run from an uninstalled tree)."""
    try:
        return metadata.version("beta_clip_jax")
    except metadata.PackageNotFoundError:
        return "unknown"


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    for k, v in tree.items():
        out |= _leaf_paths(v, prefix + (k,)) if isinstance(v, Mapping) else {prefix + (k,)}
    return out


def _check_covered(params: Mapping, cfg) -> None:
    """Every parameter must have a place in the export; a silently dropped one would only show
    up as wrong numbers in PyTorch."""
    have, known = _leaf_paths(params), table_paths(cfg)
    if have != known:
        untabled = ["/".join(p) for p in sorted(have - known)]
        missing = ["/".join(p) for p in sorted(known - have)]
        method = cfg.get("method", "beta_clip")
        raise ValueError(
            f"parameters do not fit the export name table (model method {method!r}): "
            f"not in the table {untabled}, absent from the params {missing}"
        )


def _check_out_dir(out: str) -> None:
    """OUT must be new, empty or an earlier export: never mix our files into another model."""
    if not os.path.isdir(out):
        if os.path.exists(out):
            raise FileExistsError(f"--out={out} exists and is not a directory")
        return
    names = os.listdir(out)
    if names and META_FILE not in names:
        raise FileExistsError(
            f"--out={out} is not empty and holds no earlier export ({META_FILE}); "
            f"choose a new or empty directory (it holds {sorted(names)[:10]})"
        )


def tokenizer_meta(context_length: int) -> dict:
    """How texts were tokenised in training (the PyTorch side needs the same)."""
    return {
        "type": "CLIP byte-level BPE (OpenAI bpe_simple_vocab_16e6)",
        "files": list(TOKENIZER_FILES),
        "vocab_size": VOCAB_SIZE,
        "sot_id": SOT,
        "eot_id": EOT,
        "context_length": context_length,
        "lowercase": True,
        "pad_id": 0,
        "truncation": "cut at context_length with the last token set to EOT",
        "note": "HF CLIPTokenizer pads with EOT instead of 0 and skips ftfy; the text embedding "
        "is taken at the first EOT either way",
    }


def export_params(
    params: Mapping,
    model_cfg,
    out: str,
    *,
    step: int | None = None,
    train_config: Mapping | None = None,
    source: str | None = None,
) -> str:
    """Writes the export of `params` (numpy or jax arrays) for `model_cfg` into `out`.

    Training-only parts (SmartCLIP's mask head) are dropped first: inference never uses them.
    """
    params, cfg = inference_params(params, model_cfg)
    if cfg.method == "holistic" and cfg.image_branches > 1:
        # Both forms have several image embeddings per image (K class tokens, or K fc2 kernels
        # in the last blocks): a Hugging Face CLIPModel has room for one.
        raise ValueError(
            f"a Holistic CLIP model with {cfg.image_branches} image branches "
            f"(branch_type={cfg.branch_type!r}) has no Hugging Face CLIPModel form; load the "
            "workdir with beta_clip_jax.api.load, which fuses the branches"
        )
    _check_covered(params, cfg)
    _check_out_dir(out)
    write_hf_dir(out, flax_to_hf_state_dict(params, cfg), hf_config_from_variant(cfg))

    from safetensors.numpy import save_file

    pooler = pooler_file_tensors(params)
    save_file(pooler, os.path.join(out, POOLER_FILE), metadata={"format": "np"})
    Tokenizer().save_hf(out, model_max_length=int(cfg.context_length))
    with open(os.path.join(out, PREPROCESSOR_FILE), "w") as f:
        json.dump(hf_preprocessor_config(int(cfg.image_size)), f, indent=2)

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": cfg.variant,
        "model": dict(cfg.items()),
        "context_length": int(cfg.context_length),
        "tokenizer": tokenizer_meta(int(cfg.context_length)),
        "pooler": {
            "file": POOLER_FILE,
            "names": "Flax paths joined by '/', Flax layout (convert/names.py POOLER_TABLE)",
            "heads": int(cfg.pooler_heads),
            "torch_module": "beta_clip_jax.torch_pooler.BetaCLIPPooler",
        },
        "step": None if step is None else int(step),
        "source": source,
        "train_config": None if train_config is None else dict(train_config),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "package_version": package_version(),
    }
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    return out


def export_workdir(workdir: str, out: str, step: int | None = None) -> str:
    """Exports the latest (or given) checkpoint of a training workdir into `out`."""
    from beta_clip_jax.checkpoint import load_params_from_workdir, read_workdir_config

    params, model_cfg, step = load_params_from_workdir(workdir, step=step)
    config = read_workdir_config(workdir)
    out = export_params(
        params,
        model_cfg,
        out,
        step=step,
        train_config=config.to_dict(),
        source=os.path.abspath(workdir),
    )
    _log.info("exported step %s of %s to %s", step, workdir, out)
    return out


def _define_flags() -> None:
    """Flags are defined only when run as a program: other CLIs share the names in one process."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/ and config.json).")
    flags.DEFINE_string("out", None, "Output directory (new, empty or an earlier export).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    f = flags.FLAGS
    out = export_workdir(f.workdir, f.out, f.step)
    print(f"exported {f.workdir} to {out}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
