"""python -m beta_clip_jax.export --workdir=DIR --out=OUT [--step=N] [--format=hf,open_clip]
[--text_encoder_only [--sdxl_text_encoder_2]]: a checkpoint for PyTorch, ready to publish.

With the default `--format=hf`, OUT becomes a Hugging Face CLIP directory that
`transformers.CLIPModel.from_pretrained(OUT)`, `CLIPTokenizer` and `CLIPProcessor` load, plus what
CLIPModel has no place for:

- config.json, model.safetensors: the two towers, both projections and the global logit_scale;
- vocab.json, merges.txt, tokenizer_config.json, preprocessor_config.json: tokenizer and images;
- beta_clip_pooler.safetensors: the pooler and its logit_scale under our Flax names
  ("pooler/query/kernel", ...), which `api.load(OUT)` reads back, and beta_clip_pooler.py (a copy
  of beta_clip_jax/torch_pooler.py, which needs no JAX) that runs it in PyTorch.

`open_clip` adds open_clip_config.json + open_clip_model.safetensors (export_formats.py);
`--text_encoder_only` writes only a diffusers `text_encoder/` + `tokenizer/` pair
(`text_encoder_2/` + `tokenizer_2/` for SDXL's second slot with `--sdxl_text_encoder_2`). Every
export also has:

- README.md: the model card (model_card.py): method, base weights and licence, data, recipe, the
  workdir's last evaluation, and how to load each layout;
- beta_clip_meta.json: variant, model config, tokenizer, context length, step, training config,
  formats, files, export time and package version.

Files are written 0644 and directories 0755 whatever the umask, and no file holds a directory of
this machine (paths in the training config are reduced to their last component), so an export
can go to shared storage or a model hub as it is. The weights go through the same name table
(convert/names.py) as imports, so the two directions cannot drift. Nothing here imports torch.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from importlib import metadata

from beta_clip_jax import methods
from beta_clip_jax.convert import META_FILE, POOLER_FILE, export_formats, model_card
from beta_clip_jax.convert.hf import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    hf_config_from_variant,
    hf_preprocessor_config,
    write_hf_dir,
)
from beta_clip_jax.convert.names import flax_to_hf_state_dict, pooler_file_tensors, table_paths
from beta_clip_jax.methods import inference_params
from beta_clip_jax.tokenizer import EOT, SOT, VOCAB_SIZE, Tokenizer

FORMAT = "beta_clip_jax export"
FORMAT_VERSION = 2  # 2: formats, files, README.md; no absolute paths
PREPROCESSOR_FILE = "preprocessor_config.json"
POOLER_CODE_FILE = "beta_clip_pooler.py"  # a copy of torch_pooler.py
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, POOLER_FILE, META_FILE, PREPROCESSOR_FILE)
EXPORT_FILES += TOKENIZER_FILES
# What each --format writes (besides README.md and beta_clip_meta.json, always there).
FORMATS = ("hf", "open_clip", "text_encoder", "sdxl_text_encoder_2")
# Every name an export of any format may hold: an earlier export's are removed before writing,
# so a re-export never leaves stale weights of another format beside the new ones.
ALL_EXPORT_NAMES = (
    EXPORT_FILES
    + (POOLER_CODE_FILE, model_card.README_FILE)
    + export_formats.OPEN_CLIP_FILES
    + export_formats.TEXT_ENCODER_DIRS
)
FILE_MODE, DIR_MODE = 0o644, 0o755  # readable by everyone sharing the storage

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


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The formats asked for, validated: known names, at least one, no repeats."""
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats or len(set(formats)) != len(formats):
        raise ValueError(
            f"export formats {list(formats)}: expected one or more distinct names of "
            f"{list(FORMATS)}" + (f" (unknown: {unknown})" if unknown else "")
        )
    return formats


def _remove_earlier_export(out: str) -> None:
    """Deletes the files and folders an earlier export left in `out` (others stay). Its meta
    file stays until the new one replaces it, so a failed export can be rerun into `out`."""
    for name in ALL_EXPORT_NAMES:
        if name == META_FILE:
            continue
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _make_out_dir(out: str) -> list[str]:
    """Creates `out` and its missing parents; returns the folders it created."""
    created, path = [], os.path.abspath(out)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(out, exist_ok=True)
    return created


def _publish_modes(out: str, names: Sequence[str], created: Sequence[str] = ()) -> None:
    """0644 files and 0755 folders for `out`, what we wrote in it and the parents we created:
    safetensors writes 0600, and a umask of 077 would hide the rest from teammates on shared
    storage."""
    for path in (*created, out):
        os.chmod(path, DIR_MODE)
    for name in names:
        path = os.path.join(out, name)
        if not os.path.isdir(path):
            os.chmod(path, FILE_MODE)
            continue
        os.chmod(path, DIR_MODE)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), DIR_MODE)
            for f in files:
                os.chmod(os.path.join(root, f), FILE_MODE)


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


def _write_hf(out: str, params: Mapping, cfg, hf_state: dict) -> list[str]:
    """The transformers CLIPModel directory, the pooler's weights and its PyTorch code."""
    from safetensors.numpy import save_file

    write_hf_dir(out, hf_state, hf_config_from_variant(cfg))
    pooler = pooler_file_tensors(params)
    save_file(pooler, os.path.join(out, POOLER_FILE), metadata={"format": "np"})
    Tokenizer().save_hf(out, model_max_length=int(cfg.context_length))
    with open(os.path.join(out, PREPROCESSOR_FILE), "w") as f:
        json.dump(hf_preprocessor_config(int(cfg.image_size)), f, indent=2)
    # torch_pooler.py sits at the package top, outside convert/ (whose __init__ imports JAX), so
    # that `beta_clip_jax.torch_pooler` imports with torch alone.
    source = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "torch_pooler.py"
    )
    shutil.copyfile(source, os.path.join(out, POOLER_CODE_FILE))
    return list(EXPORT_FILES) + [POOLER_CODE_FILE]


def _write_formats(out: str, params: Mapping, cfg, formats: tuple[str, ...]) -> list[str]:
    hf_state = flax_to_hf_state_dict(params, cfg)
    written = [META_FILE, model_card.README_FILE]  # written last, by export_params
    for fmt in formats:
        if fmt == "hf":
            written += _write_hf(out, params, cfg, hf_state)
        elif fmt == "open_clip":
            written += export_formats.write_open_clip(out, hf_state, cfg)
        else:
            written += export_formats.write_text_encoder(out, hf_state, cfg, fmt)
    return sorted(set(written))


def _meta(cfg, formats, written, step, train_config, source) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "formats": list(formats),
        "files": written,
        "variant": cfg.variant,
        "model": dict(cfg.items()),
        "context_length": int(cfg.context_length),
        "tokenizer": tokenizer_meta(int(cfg.context_length)),
        "pooler": {
            "file": POOLER_FILE,
            "names": "Flax paths joined by '/', Flax layout (convert/names.py POOLER_TABLE)",
            "heads": int(cfg.pooler_heads),
            "torch_module": (f"{POOLER_CODE_FILE} (beta_clip_jax.torch_pooler).BetaCLIPPooler"),
        },
        "step": None if step is None else int(step),
        "source": None if source is None else model_card.public_name(str(source)),
        "train_config": None
        if train_config is None
        else model_card.scrub_local_paths(dict(train_config)),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "package_version": package_version(),
    }


def export_params(
    params: Mapping,
    model_cfg,
    out: str,
    *,
    step: int | None = None,
    train_config: Mapping | None = None,
    source: str | None = None,
    formats: Sequence[str] = ("hf",),
    evaluation: Mapping[str, Mapping] | None = None,
) -> str:
    """Writes the export of `params` (numpy or jax arrays) for `model_cfg` into `out`, in each
    of `formats` (FORMATS), with its model card; `evaluation` ({dataset: {"step": s,
    "metrics": {...}}}, model_card.last_evaluation) goes into the card's table.

    Training-only parts of the method (methods.inference_params) are dropped first: inference
    never uses them.
    """
    formats = check_formats(formats)
    params, cfg = inference_params(params, model_cfg)
    refusal = methods.method_of(cfg).export_refusal(cfg)
    if refusal:
        raise ValueError(refusal)
    _check_covered(params, cfg)
    _check_out_dir(out)
    created = _make_out_dir(out)
    _remove_earlier_export(out)
    written = _write_formats(out, params, cfg, formats)
    meta = _meta(cfg, formats, written, step, train_config, source)
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    card = model_card.CardInputs(
        cfg=dict(cfg.items()),
        name=os.path.basename(os.path.normpath(os.path.abspath(out))),
        formats=formats,
        step=meta["step"],
        train_config=meta["train_config"],
        evaluation=dict(evaluation or {}),
        package_version=meta["package_version"],
    )
    with open(os.path.join(out, model_card.README_FILE), "w", encoding="utf-8") as f:
        f.write(model_card.render_model_card(card))
    _publish_modes(out, written, created)
    return out


def export_workdir(
    workdir: str, out: str, step: int | None = None, *, formats: Sequence[str] = ("hf",)
) -> str:
    """Exports the latest (or given) checkpoint of a training workdir into `out`, with the
    workdir's last evaluation up to that step in the model card."""
    from beta_clip_jax.checkpoint import load_params_from_workdir, read_workdir_config
    from beta_clip_jax.step import abstract_params

    formats = check_formats(formats)
    params, model_cfg, step = load_params_from_workdir(workdir, abstract_params, step=step)
    config = read_workdir_config(workdir)
    out = export_params(
        params,
        model_cfg,
        out,
        step=step,
        train_config=config.to_dict(),
        source=os.path.basename(os.path.normpath(os.path.abspath(workdir))),
        formats=formats,
        evaluation=model_card.last_evaluation(workdir, up_to_step=step),
    )
    _log.info("exported step %s of %s to %s (%s)", step, workdir, out, ", ".join(formats))
    return out
