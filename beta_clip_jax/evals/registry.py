"""Evaluators from `config.evals`, and the console table of their results.

`config.evals` maps a dataset name to its settings, e.g.

    evals.urban1k = dict(kind="urban1k", root="/data/Urban1k", every=1000, batch_size=64)
    evals.fgovd = dict(kind="fgovd", root="/data/fgovd", image_root="/data/coco", every=1000)

The name becomes the metric prefix (`eval/<name>/<metric>`). Building reads every manifest, so a
missing path or an unknown kind stops the run before anything is compiled.
"""

from __future__ import annotations

from typing import Any

from beta_clip_jax.evals.base import Evaluator, cfg_get
from beta_clip_jax.evals.fgovd import FgovdEvaluator
from beta_clip_jax.evals.intramodal import IntraModalEvaluator
from beta_clip_jax.evals.retrieval import TCI_PREFIX, RetrievalEvaluator
from beta_clip_jax.evals.synthetic_eval import SyntheticEvaluator
from beta_clip_jax.evals.zeroshot import ZeroShotEvaluator

KINDS: dict[str, type[Evaluator]] = {
    "urban1k": RetrievalEvaluator,
    "sharegpt4v_1k": RetrievalEvaluator,
    "dci": RetrievalEvaluator,
    "coco": RetrievalEvaluator,
    "flickr30k": RetrievalEvaluator,
    "jsonl": RetrievalEvaluator,
    "fgovd": FgovdEvaluator,
    "zeroshot": ZeroShotEvaluator,
    "synthetic": SyntheticEvaluator,
    "intramodal": IntraModalEvaluator,
}


def _items(cfg: Any) -> list[tuple[str, Any]]:
    if cfg is None:
        return []
    if hasattr(cfg, "items"):
        return list(cfg.items())
    raise TypeError(f"config.evals must map names to settings, got {type(cfg).__name__}")


def build_evaluator(name: str, cfg: Any, image_size: int | None = None) -> Evaluator:
    """One evaluator from its settings; unknown kinds are an error that lists the known ones."""
    kind = cfg_get(cfg, "kind", None)
    if kind not in KINDS:
        raise ValueError(
            f"evaluator {name!r}: unknown kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}"
        )
    return KINDS[kind](name, cfg, image_size)


def build_evaluators(evals_cfg: Any, image_size: int | None = None) -> list[Evaluator]:
    """All evaluators of `config.evals` (name -> settings), in the config's iteration order.

    image_size (the model's input size, optional) sizes the synthetic scenes before any encoder
    exists; evaluators otherwise take the size from `encoder.image_size` at run time.
    """
    return [build_evaluator(name, cfg, image_size) for name, cfg in _items(evals_cfg)]


def run_evaluators(
    evaluators: list[Evaluator], encoder, step: int | None = None
) -> dict[str, dict[str, float]]:
    """Results of the evaluators due at `step` (all of them when step is None), by name.

    Every process must call this at the same steps: the encoder calls are collective.
    """
    return {ev.name: ev.run(encoder) for ev in evaluators if step is None or ev.should_run(step)}


def flatten(results: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """{dataset: {metric: v}} -> {"eval/<dataset>/<metric>": v}, the metrics.jsonl keys."""
    return {
        f"{prefix}/{d}/{k}": float(v) for d, metrics in results.items() for k, v in metrics.items()
    }


def _fmt(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 100 else f"{value:.2f}"


# Metrics in the order a reader compares them: retrieval R@1/5/10 by direction, FG-OVD and box
# splits by difficulty, then the rest alphabetically, counts last.
METRIC_ORDER = (
    "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10",
    "hard", "medium", "easy", "trivial",
    "box_hard", "box_medium", "box_easy", "box_binding", "box_pointing", "pooler_box_attention",
    "caption_neg_acc", "top1", "top5",
)  # fmt: skip
_COUNTS = ("num_images", "num_texts", "num_classes", "skipped")


def _order(name: str) -> tuple:
    if name in METRIC_ORDER:
        return (0, METRIC_ORDER.index(name), name)
    return (2 if name in _COUNTS else 1, 0, name)


def _wrap(cells: list[str], width: int) -> list[str]:
    """Cells joined by two spaces into lines of at most `width` characters (one cell a line at
    the least)."""
    lines, line = [], ""
    for cell in cells:
        if line and len(line) + 2 + len(cell) > width:
            lines.append(line)
            line = cell
        else:
            line = f"{line}  {cell}" if line else cell
    return lines + ([line] if line else [])


def format_table(results: dict[str, dict[str, float]], width: int | None = None) -> str:
    """A plain-text table, one row per dataset and scoring, metrics in METRIC_ORDER, wrapped to
    `width` columns (default: the terminal's, 100 when unknown).

    Text-conditioned ("tci_") numbers get their own row, marked as not a dual-encoder protocol,
    so they are never read as the standard retrieval score.
    """
    import shutil

    width = width or shutil.get_terminal_size((100, 24)).columns
    rows: list[tuple[str, str, list[str]]] = []
    for dataset, metrics in results.items():
        plain = {k: v for k, v in metrics.items() if not k.startswith(TCI_PREFIX)}
        tci = {k[len(TCI_PREFIX) :]: v for k, v in metrics.items() if k.startswith(TCI_PREFIX)}
        for scoring, group in (("dual-encoder", plain), ("text-conditioned*", tci)):
            if group:
                cells = [f"{k}={_fmt(group[k])}" for k in sorted(group, key=_order)]
                rows.append((dataset, scoring, cells))
    if not rows:
        return "(no evaluation results)"
    w0 = max(len("dataset"), *(len(r[0]) for r in rows))
    w1 = max(len("scoring"), *(len(r[1]) for r in rows))
    indent = w0 + w1 + 4
    lines = [f"{'dataset':<{w0}}  {'scoring':<{w1}}  metrics"]
    lines.append("-" * max(len(lines[0]), min(width, 100)))
    for dataset, scoring, cells in rows:
        wrapped = _wrap(cells, max(20, width - indent))
        lines.append(f"{dataset:<{w0}}  {scoring:<{w1}}  {wrapped[0]}")
        lines += [" " * indent + more for more in wrapped[1:]]
    if any(r[1].startswith("text-conditioned") for r in rows):
        lines.append(
            "* each gallery image pooled with its own caption (beta-CLIP's logged score); "
            "not a leak-free retrieval protocol"
        )
    return "\n".join(lines)
