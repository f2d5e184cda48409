"""PNGs of one finished run: its training curves and where one phrase looks in one scene.

    from beta_clip_jax.reporting.plots import write_run_plots
    write_run_plots("runs/ce")  # -> runs/ce/curves.png, runs/ce/heatmap.png

    python -m beta_clip_jax.reporting.plots --workdir=runs/ce  # the same, plus the results table

Everything is read back from the workdir (config.json, metrics.jsonl, the last checkpoint), so it
works on any finished or interrupted run, and the trainer can call it at the end of a run.
"""

from __future__ import annotations

import json
import logging

from absl import app, flags
from etils import epath

from beta_clip_jax import methods
from beta_clip_jax.losses import cal
from beta_clip_jax.reporting.metrics_writer import latest_per_step, read_metrics

# Curves drawn in the lower panel, when the run logged them (eval/<dataset>/<metric>).
EVAL_CURVES = (
    "box_hard", "box_binding", "box_medium", "box_easy", "caption_neg_acc",
    "t2i_r1", "i2t_r1", "hard", "medium", "easy", "trivial", "top1",
)  # fmt: skip
TRAIN_CURVES = ("train/loss", "train/loss_global", "train/loss_cal")


def read_run_metrics(workdir: str) -> list[dict]:
    """metrics.jsonl as one record per step, the last write of each key winning: a rerun's lines
    replace those of a crashed run before it (metrics_writer.latest_per_step)."""
    return latest_per_step(read_metrics(workdir))


def read_config(workdir: str) -> dict:
    """The resolved config the trainer wrote (config.json), as a plain dict."""
    return json.loads((epath.Path(workdir) / "config.json").read_text())


def synthetic_eval_name(config: dict) -> str | None:
    """The name (metric prefix) of the run's first synthetic evaluator, if it has one."""
    for name, cfg in (config.get("evals") or {}).items():
        if isinstance(cfg, dict) and cfg.get("kind") == "synthetic":
            return name
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def write_curves(workdir: str, out: str, title: str = "") -> str:
    """Training losses (top) and the synthetic evaluation metrics (bottom) against step."""
    plt = _pyplot()
    records = read_run_metrics(workdir)
    config = read_config(workdir)
    dataset = synthetic_eval_name(config) or next(iter(config.get("evals") or {}), None)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for key in TRAIN_CURVES:
        steps, values = _series(records, key)
        if steps:
            top.plot(steps, values, label=key.split("/", 1)[1])
    top.set_ylabel("training loss")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    if dataset:
        for metric in EVAL_CURVES:
            steps, values = _series(records, f"eval/{dataset}/{metric}")
            if steps:
                bottom.plot(steps, values, marker="o", label=metric)
        bottom.legend(fontsize=8, ncol=2)
    bottom.set_ylabel(f"eval/{dataset or '-'} (%)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    start = cal_start_step(config)
    if start:  # before it loss_cal is logged but not trained (weight 0, pooler frozen)
        for ax in (top, bottom):
            ax.axvline(start, color="grey", linestyle="--", linewidth=1)
        top.annotate(
            " β-CAL on", (start, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8
        )
    fig.suptitle(title or run_label(config), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def method_name(config: dict) -> str:
    """The run's method: config.method, or loss.name in a config.json older than that field."""
    return str(config.get("method") or config.get("loss", {}).get("name") or "beta_clip")


def _trains_cal(config: dict) -> bool:
    name = method_name(config)
    return name in methods.method_names() and methods.get_method(name).uses_cal


def cal_start_step(config: dict) -> int:
    """The step at which the run switches β-CAL on (0: from the start, or no β-CAL)."""
    if not _trains_cal(config):
        return 0
    return cal.cal_start_step(config.get("loss", {}))


def run_label(config: dict) -> str:
    """'clip', 'beta_clip ce beta=0.5' or, when β-CAL starts late, 'beta_clip ce beta=0.5
    cal_start=500': what the comparison groups runs by (β-CAL's settings, for a method that
    trains it)."""
    loss = config.get("loss", {})
    name = method_name(config)
    if not _trains_cal(config):
        return name
    label = f"{name} {loss.get('mode', 'ce')} beta={loss.get('beta')}"
    start = cal_start_step(config)
    return f"{label} cal_start={start}" if start > 0 else label


def demo_scene(config: dict, index: int = 0) -> dict:
    """Record `index` of the run's synthetic evaluation split, drawn at the model's input size."""
    from beta_clip_jax.data.synthetic import SyntheticScenes

    dataset = synthetic_eval_name(config)
    ev = config["evals"][dataset] if dataset else {}
    size = int(
        ev.get("image_size") or config["data"].get("image_size") or config["model"]["image_size"]
    )
    options = {k: int(ev[k]) for k in ("min_objects", "max_objects") if ev.get(k)}
    scenes = SyntheticScenes(
        num_examples=index + 1,
        image_size=size,
        seed=int(ev.get("seed") or 0),
        split=ev.get("split") or "eval",
        **options,
    )
    return scenes[index]


def heatmap_example(workdir: str, config: dict, scene_index: int = 0) -> tuple:
    """(image, text) to draw: a synthetic eval scene and its first box text when the run has a
    synthetic evaluator; else the run's own data: the first image and caption of its first
    retrieval evaluator (a held-out set), else of its training data."""
    if synthetic_eval_name(config):
        record = demo_scene(config, scene_index)
        return record["image"], record["box_texts"][0]
    from beta_clip_jax.evals.base import load_image
    from beta_clip_jax.evals.registry import build_evaluator

    for name, cfg in (config.get("evals") or {}).items():
        try:
            data = getattr(build_evaluator(name, cfg), "data", None)
        except (ValueError, OSError):  # a path gone since training: try the next source
            continue
        if data is not None and getattr(data, "image_paths", None):
            return load_image(data.image_paths[scene_index]), _first_sentence(data.captions[0])
    import ml_collections

    from beta_clip_jax.data import sources

    data_cfg = ml_collections.ConfigDict(config["data"])
    size = int(config["data"].get("image_size") or config["model"]["image_size"])
    record = sources.make_source(data_cfg, size)[scene_index]
    image = record.get("image_path", record.get("image"))
    return sources.load_image(image), _first_sentence(str(record.get("caption", "")))


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].strip() or text


def write_heatmap(workdir: str, out: str, scene_index: int = 0, text: str | None = None) -> str:
    """The pooler attention and patch-text similarity of one phrase over one image
    (heatmap_example's; `text` overrides the phrase), from the last checkpoint."""
    from beta_clip_jax import api
    from beta_clip_jax.reporting import visualize

    image, default_text = heatmap_example(workdir, read_config(workdir), scene_index)
    encoder = api.load(str(workdir))
    visualize.visualize(encoder, image, text or default_text, out)
    return out


def write_run_plots(workdir: str, scene_index: int = 0, text: str | None = None) -> dict:
    """curves.png and heatmap.png in the workdir; returns {"curves": path, "heatmap": path}."""
    root = epath.Path(workdir)
    paths = {
        "curves": write_curves(str(workdir), str(root / "curves.png")),
        "heatmap": write_heatmap(str(workdir), str(root / "heatmap.png"), scene_index, text),
    }
    logging.info("wrote %s", ", ".join(paths.values()))
    return paths


def final_results(workdir: str) -> tuple[int, dict[str, dict[str, float]]]:
    """(step, {dataset: {metric: value}}) of the run's last evaluation in metrics.jsonl."""
    step, results = -1, {}
    for record in read_run_metrics(workdir):
        found = [k for k in record if k.startswith("eval/")]
        if not found or record["step"] < step:
            continue
        if record["step"] > step:
            step, results = record["step"], {}
        for key in found:
            _, dataset, metric = key.split("/", 2)
            results.setdefault(dataset, {})[metric] = record[key]
    if not results:
        raise ValueError(f"{workdir}: metrics.jsonl has no eval/ results")
    return step, results


def final_table(workdir: str) -> str:
    """The last evaluation as the trainer's console table, with a header naming run and step."""
    from beta_clip_jax.evals.registry import format_table

    step, results = final_results(workdir)
    title = f"final evaluation of {workdir} ({run_label(read_config(workdir))}, step {step})"
    return "\n".join(["=" * len(title), title, "=" * len(title), format_table(results)])


def report_run(workdir: str, scene_index: int = 0, text: str | None = None) -> dict:
    """Prints the final results table, writes curves.png and heatmap.png; returns the paths.

    What a demo run ends with (the trainer calls it when config.write_plots is set).
    """
    print(final_table(workdir), flush=True)
    paths = write_run_plots(workdir, scene_index, text)
    print("wrote " + ", ".join(paths.values()), flush=True)
    return paths


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command's flags; defined only when it runs (cli.run_command, or as __main__)."""
    flags.DEFINE_string("workdir", None, "a finished (or stopped) run", flag_values=flag_values)
    flags.DEFINE_string(
        "text", None, "phrase for the heat map (default: a box)", flag_values=flag_values
    )
    flags.DEFINE_integer("scene", 0, "synthetic eval scene index", flag_values=flag_values)
    flags.mark_flag_as_required("workdir", flag_values=flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report_run(flag_values.workdir, flag_values.scene, flag_values.text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
