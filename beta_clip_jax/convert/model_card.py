"""The README.md model card of an export, and the path scrubbing of everything an export writes.

The card says what the model is (the method of the workdir's config), its base weights and
their licence, the training data and recipe, the workdir's last evaluation as a table, and how to
load each layout the export holds (transformers, the beta-CLIP pooler, open_clip, diffusers).

An export is meant to be copied to shared storage or a model hub, so no file in it may carry a
directory of the machine it was made on: `public_name` reduces an absolute path (alone, after a
weight-spec prefix such as "openai:", or in a comma-separated list) to its last component, and
`scrub_local_paths` does so through a whole config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

from beta_clip_jax import methods
from beta_clip_jax.evals.registry import METRIC_ORDER
from beta_clip_jax.evals.retrieval import TCI_PREFIX

README_FILE = "README.md"
EVAL_RESULTS_FILE = "eval_results.json"  # written by an evaluation-only run (train.py)
_SPEC = re.compile(r"^((?:hf|openai|bclip|workdir):|file://)?(.*)$", re.S)

# OpenAI's released CLIP checkpoints: file stem (ViT-B-16.pt) -> (name, Hugging Face Hub id).
_OPENAI_CLIP = {
    "ViT-B-32": ("OpenAI CLIP ViT-B/32", "openai/clip-vit-base-patch32"),
    "ViT-B-16": ("OpenAI CLIP ViT-B/16", "openai/clip-vit-base-patch16"),
    "ViT-L-14": ("OpenAI CLIP ViT-L/14", "openai/clip-vit-large-patch14"),
    "ViT-L-14-336px": ("OpenAI CLIP ViT-L/14@336px", "openai/clip-vit-large-patch14-336"),
}
# ... and by the Hub directory name a local copy usually keeps (clip-vit-base-patch16).
_OPENAI_BY_NAME = {
    **_OPENAI_CLIP,
    **{hub.split("/")[1]: (n, hub) for n, hub in _OPENAI_CLIP.values()},
}
_OPENAI_LICENSE = "mit"  # OpenAI released CLIP's code and weights under the MIT licence

_COUNTS = ("num_images", "num_texts", "num_classes", "skipped")


def public_name(value: str) -> str:
    """`value` with every absolute local path reduced to its last component: "/data/x.pt" ->
    "x.pt", "openai:/w/ViT-B-16.pt" -> "openai:ViT-B-16.pt", "a,/b/c" -> "a,c", "run /w/x" ->
    "run x" (each comma- or space-separated word). Relative paths and remote URLs (gs://...)
    stay as they are."""
    return re.sub(r"[^\s,]+", lambda m: _public_part(m.group()), value)


def _public_part(part: str) -> str:
    prefix, path = _SPEC.match(part).groups()
    path = path.strip()
    if not (os.path.isabs(path) or path.startswith("~")):
        return part
    name = os.path.basename(path.rstrip("/\\"))
    return f"{prefix or ''}{name}" if prefix != "file://" else name


def scrub_local_paths(obj):
    """A copy of a JSON-like tree (a config) with public_name applied to every string."""
    if isinstance(obj, str):
        return public_name(obj)
    if isinstance(obj, Mapping):
        return {k: scrub_local_paths(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub_local_paths(v) for v in obj]
    return obj


@dataclasses.dataclass(frozen=True)
class BaseWeights:
    """Where training started: config.init as a name, what it is, and its licence if known."""

    spec: str  # config.init with paths reduced to names ("openai:ViT-B-16.pt"); "" = random
    name: str
    hub_id: str | None = None
    license: str | None = None  # the Hub's licence id ("mit"); None when not known


def base_weights(init: str) -> BaseWeights:
    """What `config.init` names: OpenAI CLIP checkpoints (MIT) are recognised by file name."""
    spec = public_name(init or "")
    if not spec:
        return BaseWeights("", "none (random initialisation)")
    prefix, path = _SPEC.match(spec).groups()
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0] if prefix != "workdir:" else ""
    if stem in _OPENAI_BY_NAME:
        name, hub = _OPENAI_BY_NAME[stem]
        return BaseWeights(spec, name, hub, _OPENAI_LICENSE)
    if stem.lower().startswith("longclip"):
        return BaseWeights(spec, f"Long-CLIP ({stem})")
    if prefix == "workdir:" or prefix is None and not os.path.splitext(path)[1]:
        return BaseWeights(spec, f"{spec} (an earlier run, export or checkpoint directory)")
    return BaseWeights(spec, spec)


def last_evaluation(workdir: str, up_to_step: int | None = None) -> dict[str, dict]:
    """{dataset: {"step": s, "metrics": {metric: value}}}: each dataset's last evaluation at or
    before `up_to_step` (the exported checkpoint; None: any) in the workdir's metrics.jsonl,
    else in eval_results.json (an evaluation-only run's). {} when neither has one."""
    from beta_clip_jax.reporting.metrics_writer import latest_per_step, read_metrics

    found: dict[str, dict] = {}
    for record in latest_per_step(read_metrics(workdir)):
        step = int(record["step"])
        if up_to_step is not None and step > up_to_step:
            continue
        datasets: dict[str, dict] = {}
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval":
                datasets.setdefault(parts[1], {})[parts[2]] = value
        for dataset, metrics in datasets.items():
            found[dataset] = {"step": step, "metrics": metrics}
    return found or _eval_results_file(workdir, up_to_step)


def _eval_results_file(workdir: str, up_to_step: int | None) -> dict[str, dict]:
    path = os.path.join(workdir, EVAL_RESULTS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    step, results = saved.get("step"), saved.get("results")
    if not isinstance(results, Mapping) or not isinstance(step, int):
        raise ValueError(f"{path}: expected {{'step': int, 'results': {{dataset: {{metric: v}}}}}}")
    if up_to_step is not None and step > up_to_step:
        return {}
    return {d: {"step": step, "metrics": dict(m)} for d, m in results.items()}


def _metric_order(name: str) -> tuple:
    plain = name.removeprefix(TCI_PREFIX)
    rank = METRIC_ORDER.index(plain) if plain in METRIC_ORDER else len(METRIC_ORDER)
    return (name in _COUNTS, name.startswith(TCI_PREFIX), rank, name)


def format_value(value) -> str:
    """A metric as the card prints it: 4 significant digits, counts as integers."""
    if isinstance(value, str):
        return value  # "nan" / "inf", as metrics.jsonl keeps non-finite values
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return str(int(value)) if value.is_integer() else f"{value:.4g}"


def evaluation_table(evaluation: Mapping[str, Mapping]) -> str:
    """A Markdown table, one row per dataset and metric (`tci_` ones marked text-conditioned)."""
    if not evaluation:
        return "No evaluation was recorded for this checkpoint in its training workdir."
    rows = ["| dataset | metric | value | step |", "|---|---|---:|---:|"]
    tci = False
    for dataset, entry in evaluation.items():
        for metric in sorted(entry["metrics"], key=_metric_order):
            label = metric
            if metric.startswith(TCI_PREFIX):
                label, tci = f"{metric.removeprefix(TCI_PREFIX)} (text-conditioned*)", True
            value = format_value(entry["metrics"][metric])
            rows.append(f"| {dataset} | {label} | {value} | {entry['step']} |")
    if tci:
        rows += ["", "*Scored through the text-conditioned pooler: not the dual-encoder protocol."]
    return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class CardInputs:
    """What the card is written from (all paths already reduced to names)."""

    cfg: Mapping  # the resolved model config
    name: str  # the export directory's name, used in the code snippets
    formats: tuple[str, ...]
    step: int | None = None
    train_config: Mapping | None = None
    evaluation: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)
    package_version: str = "unknown"


def _get(tree: Mapping | None, dotted: str, default=None):
    for key in dotted.split("."):
        if not isinstance(tree, Mapping) or key not in tree:
            return default
        tree = tree[key]
    return tree


def _method(inputs: CardInputs) -> tuple[str, str]:
    """(title, summary) of the training method (config.method; loss.name in older configs)."""
    name = (
        _get(inputs.train_config, "method")
        or _get(inputs.train_config, "loss.name")
        or inputs.cfg.get("method", "beta_clip")
    )
    if name in methods.method_names():
        method = methods.get_method(name)
        return method.title, method.summary
    return str(name), f"CLIP fine-tuned with method {name!r}"


def _front_matter(inputs: CardInputs, base: BaseWeights) -> str:
    library = "open_clip" if inputs.formats == ("open_clip",) else "transformers"
    tags = ["clip", "beta-clip", "long-text", "fine-grained"]
    tags += ["open_clip"] if "open_clip" in inputs.formats else []
    tags += ["diffusers", "text-encoder"] if _text_encoder_formats(inputs) else []
    lines = ["---", f"license: {base.license or 'other'}", f"library_name: {library}"]
    if base.hub_id:
        lines.append(f"base_model: {base.hub_id}")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    pipeline = (
        "feature-extraction" if not _has_full_model(inputs) else "zero-shot-image-classification"
    )
    lines += [f"pipeline_tag: {pipeline}", "---"]
    return "\n".join(lines)


def _text_encoder_formats(inputs: CardInputs) -> list[str]:
    return [f for f in inputs.formats if f in ("text_encoder", "sdxl_text_encoder_2")]


def _has_full_model(inputs: CardInputs) -> bool:
    return "hf" in inputs.formats or "open_clip" in inputs.formats


def _model_section(inputs: CardInputs) -> str:
    c = inputs.cfg
    step = "unknown" if inputs.step is None else str(inputs.step)
    return "\n".join(
        [
            "## Model",
            "",
            f"- architecture: ViT {c['variant']} ({c['vision_layers']} x {c['vision_width']} "
            f"vision, patch {c['patch_size']}, {c['image_size']} px; {c['text_layers']} x "
            f"{c['text_width']} text), embedding {c['embed_dim']}",
            f"- text context: {c['context_length']} tokens (OpenAI CLIP: 77)",
            f"- text-conditioned pooler: {c['pooler_heads']} heads"
            + (" (`beta_clip_pooler.*`)" if "hf" in inputs.formats else " (not in this export)"),
            f"- checkpoint: step {step}; exported by beta_clip_jax {inputs.package_version}",
        ]
    )


def _accumulation(steps) -> str:
    return f" ({steps} accumulated micro-batches)" if steps and int(steps) > 1 else ""


def _recipe_lines(cfg: Mapping) -> list[str]:
    epochs = _get(cfg, "num_epochs") or 0
    length = f"{epochs:g} epochs" if epochs else f"{_get(cfg, 'num_steps', '?')} steps"
    lr = f"{_get(cfg, 'optim.lr', '?')} -> {_get(cfg, 'optim.final_lr', '?')} (cosine)"
    pooler_lr = f"{_get(cfg, 'optim.pooler_lr', '?')} -> {_get(cfg, 'optim.pooler_final_lr', '?')}"
    return [
        f"- loss: {_get(cfg, 'loss.name', '?')}, mode {_get(cfg, 'loss.mode', '?')}, "
        f"β = {_get(cfg, 'loss.beta', '?')}, β-CAL groups of {_get(cfg, 'loss.group_size', '?')} "
        f"images, global InfoNCE gradient {_get(cfg, 'loss.global_gradient', '?')}",
        f"- batch: {_get(cfg, 'batch_size', '?')} images per optimiser step"
        + _accumulation(_get(cfg, "optim.grad_accum", 1)),
        f"- length: {length}",
        f"- learning rate: towers {lr}, pooler {pooler_lr}, AdamW "
        f"({_get(cfg, 'optim.b1', '?')}, {_get(cfg, 'optim.b2', '?')}), weight decay "
        f"{_get(cfg, 'optim.weight_decay', '?')}",
        f"- compute dtype: {_get(cfg, 'model.dtype', 'float32')}",
    ]


def _training_section(inputs: CardInputs, base: BaseWeights) -> str:
    cfg = inputs.train_config
    lines = ["## Training", ""]
    if cfg is None:
        return "\n".join(lines + ["Training details were not recorded with these weights."])
    base_text = base.name if base.spec in ("", base.name) else f"{base.name} (`{base.spec}`)"
    data_path = public_name(str(_get(cfg, "data.path") or ""))
    data = f"`{_get(cfg, 'data.name', '?')}`" + (f", file `{data_path}`" if data_path else "")
    lines += [f"- base weights: {base_text}", f"- data: {data}", *_recipe_lines(cfg)]
    return "\n".join(lines)


def _transformers_usage(name: str) -> str:
    return f'''### transformers

```python
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

model = CLIPModel.from_pretrained("{name}")
processor = CLIPProcessor.from_pretrained("{name}")
inputs = processor(
    text=["a red cube left of a blue ball"],
    images=[Image.open("scene.jpg")],
    return_tensors="pt",
    padding=True,
    truncation=True,  # at the model's context length, not 77
)
with torch.no_grad():
    out = model(**inputs)
image_embeds, text_embeds = out.image_embeds, out.text_embeds  # L2-normalised
```

### The text-conditioned pooler (PyTorch only)

`beta_clip_pooler.py` in this directory needs only torch, transformers, safetensors and numpy:

```python
import sys

sys.path.insert(0, "{name}")  # the directory holding beta_clip_pooler.py
from beta_clip_pooler import from_pretrained

clip, pooler = from_pretrained("{name}")
with torch.no_grad():
    dense = pooler.dense_features(inputs.pixel_values)  # [1, h, w, E] patch features
    pooled = pooler.pooled_embeddings(inputs.pixel_values, inputs.input_ids)  # [1, E]
```
'''


def _open_clip_usage(name: str, context: int) -> str:
    return f"""### open_clip

```python
import open_clip
import torch
from PIL import Image

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{name}")
tokenizer = open_clip.get_tokenizer("local-dir:{name}")  # {context}-token context
model.eval()
with torch.no_grad():
    image = model.encode_image(preprocess(Image.open("scene.jpg"))[None], normalize=True)
    text = model.encode_text(tokenizer(["a red cube left of a blue ball"]), normalize=True)
```

From the Hub, use `"hf-hub:ORG/NAME"` in place of `"local-dir:{name}"`.
"""


def _sd1_usage(inputs: CardInputs) -> list[str]:
    """Stable Diffusion 1.x with this text encoder: its own folder, or the CLIPModel's."""
    width, context = inputs.cfg["text_width"], inputs.cfg["context_length"]
    fits = "fits" if width == 768 else "does not fit"
    own = "text_encoder" in inputs.formats
    sub, tok_sub = (', subfolder="text_encoder"', ', subfolder="tokenizer"') if own else ("", "")
    lines = [
        f"The text encoder is {width} wide with {context} positions: it {fits} Stable "
        "Diffusion 1.x, whose UNet cross-attends to 768-wide text states (an L/14 text tower).",
    ]
    if not own:
        lines[0] += (
            " CLIPTextModel reads the text tower out of this CLIPModel directory (the vision "
            "weights are reported unused); `--text_encoder_only` exports a folder of its own."
        )
    return lines + [
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "from transformers import CLIPTextModel, CLIPTokenizer",
        "",
        f'text_encoder = CLIPTextModel.from_pretrained("{inputs.name}"{sub})',
        f'tokenizer = CLIPTokenizer.from_pretrained("{inputs.name}"{tok_sub})'
        f"  # model_max_length={context}",
        "pipe = StableDiffusionPipeline.from_pretrained(",
        '    "path/to/stable-diffusion-v1-5", text_encoder=text_encoder, tokenizer=tokenizer',
        ")",
        f'image = pipe("a long, detailed prompt of up to {context} tokens ...").images[0]',
        "```",
    ]


def _sdxl_usage(inputs: CardInputs) -> list[str]:
    """SDXL's second slot: both encoders must give the same number of positions."""
    c = inputs.cfg
    width, embed, context = c["text_width"], c["embed_dim"], c["context_length"]
    fits = "fits" if (width, embed) == (1280, 1280) else "does not fit"
    return [
        f"`text_encoder_2/` + `tokenizer_2/` fill SDXL's second slot (CLIPTextModelWithProjection, "
        f"{width} wide, projection {embed}, {context} positions). It {fits} the stock SDXL UNet, "
        "which takes a 1280-wide second encoder with a 1280 projection (OpenCLIP bigG). SDXL "
        "concatenates both encoders' states per position, so both must give the same sequence "
        f"length: pair it with a first encoder of {context} positions, or encode the prompt "
        "yourself and pass `prompt_embeds` / `pooled_prompt_embeds` (beta_clip_jax's "
        "docs/export.md).",
        "",
        "```python",
        "from diffusers import StableDiffusionXLPipeline",
        "from transformers import CLIPTextModelWithProjection, CLIPTokenizer",
        "",
        "text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(",
        f'    "{inputs.name}", subfolder="text_encoder_2"',
        ")",
        f'tokenizer_2 = CLIPTokenizer.from_pretrained("{inputs.name}", subfolder="tokenizer_2")',
        "pipe = StableDiffusionXLPipeline.from_pretrained(",
        '    "path/to/sdxl",',
        f"    text_encoder=first_encoder_{context},  # CLIPTextModel with {context} positions",
        f"    tokenizer=first_tokenizer_{context},  # model_max_length={context}",
        "    text_encoder_2=text_encoder_2,",
        "    tokenizer_2=tokenizer_2,",
        ")",
        "```",
    ]


def _diffusers_usage(inputs: CardInputs) -> str:
    text = ["### diffusers", ""]
    if "hf" in inputs.formats or "text_encoder" in inputs.formats:
        text += _sd1_usage(inputs)
    if "sdxl_text_encoder_2" in inputs.formats:
        text += ([""] if len(text) > 2 else []) + _sdxl_usage(inputs)
    return "\n".join(text) + "\n"


def _usage_section(inputs: CardInputs) -> str:
    parts = ["## Use", ""]
    if "hf" in inputs.formats:
        parts.append(_transformers_usage(inputs.name))
    if "open_clip" in inputs.formats:
        parts.append(_open_clip_usage(inputs.name, inputs.cfg["context_length"]))
    if "hf" in inputs.formats or _text_encoder_formats(inputs):
        parts.append(_diffusers_usage(inputs))
    return "\n".join(parts)


def _license_section(base: BaseWeights) -> str:
    if base.license == _OPENAI_LICENSE:
        text = (
            f"The base weights, {base.name}, were released by OpenAI under the MIT licence; "
            "these fine-tuned weights derive from them. The training data has its own terms."
        )
    elif base.spec == "":
        text = "Trained from a random initialisation: no base model's licence applies."
    else:
        text = f"See the base model's licence ({base.name}); the training data has its own terms."
    return "## Licence\n\n" + text


def render_model_card(inputs: CardInputs) -> str:
    """The README.md text of an export."""
    short, long = _method(inputs)
    base = base_weights(str(_get(inputs.train_config, "init") or ""))
    c = inputs.cfg
    title = f"{short} ViT {c['variant']}, {c['context_length']}-token text"
    intro = (
        f"{long}. Exported from a beta_clip_jax training run (model method "
        f"`{c.get('method', 'beta_clip')}`)."
    )
    sections = [
        _front_matter(inputs, base),
        f"# {title}",
        intro,
        _model_section(inputs),
        _training_section(inputs, base),
        "## Evaluation\n\n" + evaluation_table(inputs.evaluation),
        _usage_section(inputs),
        _license_section(base),
    ]
    return "\n\n".join(s.rstrip("\n") for s in sections) + "\n"
