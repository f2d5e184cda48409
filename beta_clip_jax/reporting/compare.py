"""Side-by-side final evaluation results of several runs, grouped by method, plus a bar chart.

    python -m beta_clip_jax.reporting.compare --workdirs=runs/clip,runs/ce,runs/bce \
        [--out=compare.png]

Each workdir's method comes from its config.json ("clip", "beta_clip ce beta=0.5", ...). Runs of
the same method (several seeds) are one column, shown as mean ± sample standard deviation over the
runs, with n. The final results are each run's last evaluation in metrics.jsonl, read as
plots.read_run_metrics does (a rerun's lines replace those of a crashed run before it).
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
from absl import app, flags

from beta_clip_jax.evals.retrieval import TCI_PREFIX
from beta_clip_jax.reporting.plots import _pyplot, final_results, read_config, run_label

# The metrics shown first, in this order, when present; other eval metrics follow.
MAIN_METRICS = (
    "box_hard",
    "box_binding",
    "box_medium",
    "box_easy",
    "box_pointing",
    "caption_neg_acc",
    "t2i_r1",
    "i2t_r1",
    "tci_t2i_r1",
    "tci_i2t_r1",
    "pooler_box_attention",
)
SKIPPED = ("num_images",)


def final_eval(workdir: str) -> tuple[int, dict[str, float]]:
    """(step, {"<dataset>/<metric>": value}) of the run's last evaluation."""
    step, results = final_results(workdir)
    return step, {f"{d}/{k}": v for d, metrics in results.items() for k, v in metrics.items()}


def collect(workdirs: list[str]) -> dict[str, list[dict]]:
    """{method label: [{"workdir", "step", "seed", "metrics"}, ...]} in first-seen order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for workdir in workdirs:
        config = read_config(workdir)
        step, metrics = final_eval(workdir)
        run = {
            "workdir": workdir,
            "step": step,
            "seed": config.get("seed"),
            "metrics": metrics,
            "config": config,
        }
        groups[run_label(config)].append(run)
    return dict(groups)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
    return out


def differing_fields(runs: list[dict]) -> list[str]:
    """Config fields (other than the seed) whose values differ between the runs of a group.

    A field that some config.json files lack (written by an older or newer version) is listed as
    "FIELD (absent from some runs)": the runs may then differ in a setting that did not exist yet.
    """
    flats = [_flat(run["config"]) for run in runs]
    common = set.intersection(*(set(f) for f in flats)) - {"seed"}
    partial = set.union(*(set(f) for f in flats)) - common - {"seed"}
    differ = sorted(k for k in common if len({f[k] for f in flats}) > 1)
    return differ + [f"{k} (absent from some runs)" for k in sorted(partial)]


def mean_spread(values) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for a single value)."""
    values = np.asarray(list(values), np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def metric_order(groups: dict[str, list[dict]], everything: bool = False) -> list[str]:
    """Metric keys to show: MAIN_METRICS in that order (all the others after them with
    everything=True), grouped by dataset."""
    keys = {k for runs in groups.values() for run in runs for k in run["metrics"]}
    keys = {k for k in keys if k.split("/")[-1] not in SKIPPED}
    if not everything:
        keys = {k for k in keys if k.split("/")[-1] in MAIN_METRICS}

    def rank(key: str):
        metric = key.split("/")[-1]
        main = MAIN_METRICS.index(metric) if metric in MAIN_METRICS else len(MAIN_METRICS)
        return (key.split("/")[0], main, metric)

    return sorted(keys, key=rank)


def summarize(groups: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{method: {metric: (mean, std, n)}} over the runs that report the metric."""
    out = {}
    for label, runs in groups.items():
        out[label] = {}
        for key in metric_order(groups, everything=True):
            values = [run["metrics"][key] for run in runs if key in run["metrics"]]
            if values:
                out[label][key] = (*mean_spread(values), len(values))
    return out


def format_comparison(groups: dict[str, list[dict]], everything: bool = False) -> str:
    """A plain-text table: one row per metric, one column per method (mean ± std over runs)."""
    summary = summarize(groups)
    labels = list(groups)
    header = ["metric (%)"] + [f"{label} (n={len(groups[label])})" for label in labels]
    rows = []
    for key in metric_order(groups, everything):
        cells = [key]
        for label in labels:
            if key not in summary[label]:
                cells.append("-")
                continue
            mean, std, n = summary[label][key]
            cells.append(f"{mean:.1f} ± {std:.1f}" if len(groups[label]) > 1 else f"{mean:.1f}")
        rows.append(cells)
    steps = sorted({run["step"] for runs in groups.values() for run in runs})
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = [line(header), "-" * len(line(header)), *(line(r) for r in rows)]
    if any(r[0].split("/")[-1].startswith(TCI_PREFIX) for r in rows):
        lines.append(
            f"{TCI_PREFIX}*: text-conditioned pooling, not a dual-encoder score "
            "(untrained pooler in runs without beta-CAL)"
        )
    if any(r[0].endswith("/pooler_box_attention") for r in rows):
        lines.append(
            "pooler_box_attention: % of the pooler's attention a box's text puts inside that box "
            "(uniform attention: the box's share of the patches)"
        )
    lines.append(
        f"final evaluation at step {', '.join(map(str, steps))}; mean ± sample std over runs"
    )
    for label in labels:
        runs = groups[label]
        lines.append(f"  {label}: " + ", ".join(f"{r['workdir']} (seed {r['seed']})" for r in runs))
        differ = differing_fields(runs)
        if differ:
            lines.append(f"    warning: these runs also differ in {', '.join(differ)}")
    return "\n".join(lines)


def plot_comparison(groups: dict[str, list[dict]], out: str) -> str:
    """Grouped bars (mean, std error bars) with each run as a dot, for the main metrics."""
    plt = _pyplot()
    summary = summarize(groups)
    keys = metric_order(groups)
    labels = list(groups)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys) + 2), 4.5))
    x = np.arange(len(keys))
    for j, label in enumerate(labels):
        pos = x - 0.4 + width * (j + 0.5)
        means = [summary[label].get(k, (np.nan, 0, 0))[0] for k in keys]
        stds = [summary[label].get(k, (0, 0.0, 0))[1] for k in keys]
        ax.bar(pos, means, width, yerr=stds, capsize=3, label=f"{label} (n={len(groups[label])})")
        for i, key in enumerate(keys):
            dots = [r["metrics"][key] for r in groups[label] if key in r["metrics"]]
            ax.plot([pos[i]] * len(dots), dots, "k.", markersize=4)
    ax.set_xticks(x, [k.split("/")[-1] for k in keys], rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def compare(workdirs: list[str], out: str = "compare.png", everything: bool = False) -> str:
    """Prints the comparison table of `workdirs` and writes the bar chart to `out` ('' for
    none); returns the table."""
    groups = collect(workdirs)
    table = format_comparison(groups, everything=everything)
    print(table)
    if out:
        plot_comparison(groups, out)
        print(f"wrote {out}")
    return table


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command's flags; defined only when it runs (cli.run_command, or as __main__)."""
    flags.DEFINE_string("workdirs", None, "comma-separated workdirs", flag_values=flag_values)
    flags.DEFINE_string("out", "compare.png", "output PNG ('' for none)", flag_values=flag_values)
    flags.DEFINE_bool("all", False, "every metric, not only the main ones", flag_values=flag_values)
    flags.mark_flag_as_required("workdirs", flag_values=flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flag_values
    compare([w for w in f.workdirs.split(",") if w], f.out, everything=f.all)


if __name__ == "__main__":
    define_flags()
    app.run(main)
