"""Evaluate any model on a benchmark, with no training data and no workdir of its own.

    python -m beta_clip_jax.evaluate --model=bclip:checkpoint_10.pt --eval=fgovd \
        --root=/data/fgovd --image_root=/data/coco --json=fgovd.json --per_item=fgovd_items.jsonl

`--model` is anything `api.load` takes (`bclip:`, `hf:`, `openai:`, a workdir, an export); it is
only read, never written. `--eval` names an evaluator kind (evals/registry.py) and may be given
several times; `--root` (and `--image_root`) then come once for all or once per `--eval`, in the
same order. `--root` is the kind's main path: the ShareGPT4V json for `sharegpt4v_1k`, the dataset
folder otherwise (no root for `synthetic`). `--set=FIELD=VALUE` sets any other evaluator field
(values are read as JSON when they parse, else as strings), e.g. `--set=caption_mode=longclip`.

`--truncation=cut` tokenises over-long texts as the β-CLIP reference evaluators do (a plain cut
at the context length, no EOT); the default keeps EOT in the last position. Only texts longer than
the context differ (none in Urban1K or FG-OVD; some ShareGPT4V-1k captions).

Prints the results table; `--json` writes {"results": {KIND: {metric: value}}, "model": SPEC,
"truncation": ...}, with the metric names the trainer writes to metrics.jsonl. `--per_item`
writes one JSON line per scored item in dataset order (FG-OVD: {"split", "index", "scores"},
the box's cosine to each of its texts, positive first; retrieval: each caption's and image's
0-based rank of its match).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags

# The field that `--root` fills, per kind; None: the kind reads no files.
ROOT_FIELDS = {"sharegpt4v_1k": "json_path", "synthetic": None}

_log = logging.getLogger(__name__)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _per_eval(values: list[str], count: int, flag: str) -> list[str | None]:
    """A flag's values aligned with the --eval list: none, one for all, or one each."""
    if not values:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"--{flag} given {len(values)} times for {count} --eval values")
    return list(values)


def eval_configs(
    kinds: list[str],
    roots: list[str],
    image_roots: list[str],
    settings: list[str],
    batch_size: int,
    max_examples: int | None,
) -> dict[str, dict]:
    """name -> evaluator settings, as `config.evals` holds them; names are the kinds (suffixed
    _2, _3 ... when a kind repeats)."""
    extra = {}
    for item in settings:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--set wants FIELD=VALUE, got {item!r}")
        extra[field] = _parse_value(value)
    configs: dict[str, dict] = {}
    aligned = zip(
        kinds,
        _per_eval(roots, len(kinds), "root"),
        _per_eval(image_roots, len(kinds), "image_root"),
        strict=True,
    )
    for kind, root, image_root in aligned:
        cfg = {"kind": kind, "batch_size": batch_size, **extra}
        field = ROOT_FIELDS.get(kind, "root")
        if field and root:
            cfg[field] = root
        if image_root:
            cfg["image_root"] = image_root
        if max_examples:
            cfg["max_examples"] = max_examples
        name, n = kind, 1
        while name in configs:
            n += 1
            name = f"{kind}_{n}"
        configs[name] = cfg
    return configs


def prepare(model_spec: str, configs: dict[str, dict], **load_kw):
    """(evaluators, encoder). Every dataset manifest is read before the model is loaded, so a bad
    path stops the command before anything compiles."""
    from beta_clip_jax import api
    from beta_clip_jax.evals.registry import build_evaluator

    evaluators = [build_evaluator(name, cfg) for name, cfg in configs.items()]
    return evaluators, api.load(model_spec, **load_kw)


def run(evaluators, encoder, *, per_item: bool = False):
    """({name: {metric: value}}, [per-item records, each tagged with its evaluator's name])."""
    results, items = {}, []
    for ev in evaluators:
        records = [] if per_item and ev.per_item else None
        if per_item and records is None:
            _log.warning("%s: kind %r writes no per-item scores", ev.name, ev.kind)
        results[ev.name] = (
            ev.run(encoder, items=records) if records is not None else ev.run(encoder)
        )
        items += [{"eval": ev.name, **r} for r in records or []]
    return results, items


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _define_flags() -> None:
    """Defined only when run as a command, so importing this module defines no flags."""
    flags.DEFINE_string("model", None, "Weights: bclip:/hf:/openai: PATH, a workdir or export.")
    flags.DEFINE_multi_string("eval", None, "Evaluator kind (repeatable): fgovd, urban1k, ...")
    flags.DEFINE_multi_string("root", [], "Dataset path per --eval (or one for all).")
    flags.DEFINE_multi_string("image_root", [], "Image folder per --eval (or one for all).")
    flags.DEFINE_multi_string("set", [], "Extra evaluator field FIELD=VALUE (repeatable).")
    flags.DEFINE_integer("batch_size", 64, "Images / texts per encoder call.")
    flags.DEFINE_integer("max_examples", None, "Evaluate only the first N examples per set.")
    flags.DEFINE_enum(
        "truncation",
        "eot",
        ["eot", "cut"],
        "Over-long texts: keep EOT last (eot) or the β-CLIP reference's plain cut (cut).",
    )
    flags.DEFINE_string("json", None, "Write {'results': {KIND: {metric: value}}} here.")
    flags.DEFINE_string("per_item", None, "Write one JSON line per scored item here.")
    flags.mark_flags_as_required(["model", "eval"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    from beta_clip_jax.evals.registry import format_table

    try:
        configs = eval_configs(f.eval, f.root, f.image_root, f.set, f.batch_size, f.max_examples)
        evaluators, encoder = prepare(
            f.model, configs, batch_size=f.batch_size, truncation=f.truncation
        )
    except (ValueError, FileNotFoundError) as e:
        # Bad paths, kinds, fields or weights: the message says what to change.
        sys.exit(f"beta_clip_jax.evaluate: {e}")
    results, items = run(evaluators, encoder, per_item=bool(f.per_item))
    print(f"model: {f.model} (over-long texts: {f.truncation})")
    print(format_table(results))
    if f.json:
        record = {"results": results, "model": f.model, "truncation": f.truncation}
        _write(f.json, json.dumps(record, indent=1) + "\n")
    if f.per_item:
        _write(f.per_item, "".join(json.dumps(r) + "\n" for r in items))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
