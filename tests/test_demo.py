"""The demo end to end, shortened: configs/demo.py trains, evaluates, prints its table and writes
its plots; compare reads the workdirs."""

import contextlib
import io
import json
import pathlib
import shutil

import numpy as np
import pytest
from absl import flags
from PIL import Image
from train_helpers import apply_overrides, load_config

from beta_clip_jax.cli import run_command
from beta_clip_jax.reporting import compare, plots
from beta_clip_jax.reporting.metrics_writer import read_metrics
from beta_clip_jax.train import train_and_evaluate


def demo_config(method: str, **overrides):
    c = load_config("demo.py", method)
    # A few steps on a small batch and a handful of eval scenes: the same code paths, seconds.
    c.num_steps = 2
    c.batch_size = 8
    c.loss.group_size = 8
    c.log_every = 1
    c.evals.synthetic.num_examples = 6
    c.evals.synthetic.every = 0  # only the final evaluation
    return apply_overrides(c, overrides)


def assert_png(path):
    with Image.open(path) as png:
        assert png.format == "PNG" and min(png.size) > 100


def test_config_methods():
    assert demo_config("clip").loss.name == "clip"
    for mode in ("ce", "bce"):
        c = demo_config(mode)
        assert (c.loss.name, c.loss.mode) == ("beta_clip", mode)
    with pytest.raises(ValueError, match="clip"):
        demo_config("siglip")


def test_beta_cal_fine_tunes_the_clip_of_the_first_half():
    """ce/bce are the clip run with β-CAL switched on halfway, wherever num_steps is set."""
    clip, ce = load_config("demo.py", "clip"), load_config("demo.py", "ce")
    assert (clip.loss.cal_start_step, ce.loss.cal_start_step) == (0, ce.num_steps // 2)
    ce.num_steps = 300  # what --config.num_steps=300 does
    assert ce.loss.cal_start_step == 150
    assert json.loads(ce.to_json())["loss"]["cal_start_step"] == 150  # what config.json records
    scratch = load_config("demo.py", "ce")
    scratch.loss.cal_start_step = 0  # β-CAL from the first step: an override stays put
    scratch.num_steps = 200
    assert scratch.loss.cal_start_step == 0
    ce.num_steps = clip.num_steps
    runs = [{"config": json.loads(c.to_json())} for c in (clip, ce)]  # as config.json holds them
    differ = compare.differing_fields(runs)
    assert differ == ["loss.cal_start_step", "loss.name"], differ


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    workdirs = {m: str(root / m) for m in ("ce", "clip")}
    printed = {}
    for method, workdir in workdirs.items():
        capture = io.StringIO()
        with contextlib.redirect_stdout(capture):
            train_and_evaluate(demo_config(method), workdir)
        printed[method] = capture.getvalue()
    return workdirs, printed


def test_demo_writes_metrics_table_and_plots(runs):
    workdirs, printed = runs
    workdir = workdirs["ce"]
    final = [r for r in read_metrics(workdir) if "eval/synthetic/box_hard" in r][-1]
    assert final["step"] == 2
    for metric in ("t2i_r1", "i2t_r1", "caption_neg_acc", "box_hard", "box_binding", "box_easy"):
        assert 0.0 <= final[f"eval/synthetic/{metric}"] <= 100.0
    # The run ends by printing the final table and writing the two PNGs into its workdir.
    table = plots.final_table(workdir)
    # The demo's β-CAL starts halfway (loss.cal_start_step follows num_steps), named in the table.
    assert "beta_clip ce beta=0.5 cal_start=1, step 2" in table and "box_hard=" in table
    assert table in printed["ce"]
    for name in ("curves.png", "heatmap.png"):
        assert_png(pathlib.Path(workdir) / name)
        assert name in printed["ce"]


def test_compare_two_methods(runs, tmp_path, capsys):
    out = tmp_path / "compare.png"
    workdirs, _ = runs
    run_command(compare, [f"--workdirs={workdirs['clip']},{workdirs['ce']}", f"--out={out}"])
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    assert "clip (n=1)" in header and "beta_clip ce beta=0.5 cal_start=1 (n=1)" in header
    assert header.index("clip (n=1)") < header.index("beta_clip")  # order of --workdirs
    assert any(line.startswith("synthetic/box_hard") for line in text.splitlines())
    # The real encoder has a pooler: the share of its attention inside the box, explained.
    (row,) = [line for line in text.splitlines() if line.startswith("synthetic/pooler_box_")]
    assert all(0.0 <= float(v) <= 100.0 for v in row.split()[1:] if v != "±")
    assert "pooler_box_attention: % of the pooler's attention" in text
    assert_png(out)


def test_plots_and_compare_commands_take_their_flags(runs, tmp_path, capsys):
    """The absl commands as the command line runs them: plots --workdir/--scene/--text redraws
    a run's PNGs; compare --all --out= prints every metric and writes no chart."""
    workdirs, _ = runs
    copy = tmp_path / "ce"
    shutil.copytree(workdirs["ce"], copy)
    (copy / "heatmap.png").unlink()
    run_command(plots, [f"--workdir={copy}", "--scene=1", "--text=a box"])
    assert_png(copy / "heatmap.png")
    assert "final evaluation of" in capsys.readouterr().out
    run_command(compare, [f"--workdirs={workdirs['ce']}", "--all", "--out="])
    text = capsys.readouterr().out
    assert "wrote" not in text and "synthetic/t2i_r5" in text
    with pytest.raises(flags.IllegalFlagValueError, match="workdirs"):
        run_command(compare, ["--all"])


def fake_run(path, seed, name, box_hard, mode="ce"):
    path.mkdir()
    config = {"seed": seed, "loss": {"name": name, "mode": mode, "beta": 0.5}, "evals": {}}
    (path / "config.json").write_text(json.dumps(config))
    records = [
        {"step": 5, "eval/synthetic/box_hard": 0.0},
        {"step": 10, "train/loss": 1.0},
        {"step": 10, "eval/synthetic/box_hard": box_hard, "eval/synthetic/num_images": 8.0},
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_compare_groups_seeds_with_mean_and_spread(tmp_path):
    dirs = [fake_run(tmp_path / f"ce{s}", s, "beta_clip", v) for s, v in enumerate((10, 20, 30))]
    dirs.append(fake_run(tmp_path / "clip", 0, "clip", 5.0))
    groups = compare.collect(dirs)
    assert list(groups) == ["beta_clip ce beta=0.5", "clip"]
    mean, std, n = compare.summarize(groups)["beta_clip ce beta=0.5"]["synthetic/box_hard"]
    assert (mean, n) == (20.0, 3)
    np.testing.assert_allclose(std, 10.0)  # sample standard deviation
    table = compare.format_comparison(groups)
    assert "20.0 ± 10.0" in table and "num_images" not in table
    assert_png(compare.plot_comparison(groups, str(tmp_path / "c.png")))


def test_compare_warns_about_settings_that_differ_within_a_group(tmp_path):
    a = fake_run(tmp_path / "a", 0, "beta_clip", 10.0)
    b = fake_run(tmp_path / "b", 1, "beta_clip", 20.0)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["model"] = {"pooler_value_init": "identity"}  # a field the older run does not have
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    groups = compare.collect([a, b])
    assert compare.differing_fields(groups["beta_clip ce beta=0.5"]) == [
        "model.pooler_value_init (absent from some runs)"
    ]
    table = compare.format_comparison(groups)
    assert "warning: these runs also differ in model.pooler_value_init" in table


def test_cal_start_step_is_read_for_beta_clip_runs_only():
    late = {"loss": {"name": "beta_clip", "mode": "ce", "beta": 0.5, "cal_start_step": 500}}
    assert plots.cal_start_step(late) == 500
    assert plots.run_label(late) == "beta_clip ce beta=0.5 cal_start=500"
    late["loss"]["name"] = "clip"  # a field left over in a CLIP run's config switches nothing
    assert plots.cal_start_step(late) == 0 and plots.run_label(late) == "clip"
    assert plots.cal_start_step({"loss": {"name": "beta_clip"}}) == 0
