"""metrics.jsonl after a crash and a rerun: truncate_after drops the dead run's lines past the
restored step, and the plots / compare readers keep one record per step, the last write winning."""

import json

import pytest

from beta_clip_jax.reporting import compare, plots
from beta_clip_jax.reporting.metrics_writer import MetricsWriter, latest_per_step, read_metrics


def write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def dead_run(last_step):
    """What a run that died after `last_step` leaves: eval at 0, compile + train at 1, ..."""
    records = [
        {"step": 0, "eval/synthetic/box_hard": 1.0},
        {"step": 1, "perf/compile_time_sec": 9.0},
    ]
    records += [{"step": s, "train/loss": 100.0 + s} for s in range(1, last_step + 1)]
    return records + [{"step": 20, "eval/synthetic/box_hard": 50.0}]


def steps_of(records, key="train/loss"):
    return [r["step"] for r in records if key in r]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"loss": {"name": "clip"}, "evals": {}}))
    return tmp_path


def test_truncate_after_restored_step_then_rerun_logs_each_step_once(workdir):
    path = workdir / "metrics.jsonl"
    records = sorted(dead_run(30), key=lambda r: r["step"])
    write_lines(path, records, tail='{"step": 31, "train/lo')  # killed mid-write
    writer = MetricsWriter(str(workdir))
    assert writer.truncate_after(25) == 5 + 1  # steps 26..30 and the half line
    for step in range(26, 41):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    got = read_metrics(str(workdir))
    assert steps_of(got) == list(range(1, 41))  # each step once, in order
    assert [r["train/loss"] for r in got if "train/loss" in r][24:26] == [125.0, 26.0]
    assert not list(workdir.glob("metrics.jsonl.tmp*"))  # the temporary file was renamed
    assert MetricsWriter(str(workdir)).truncate_after(40) == 0  # nothing past 40: untouched


def test_truncate_after_minus_one_empties_a_dead_run_that_saved_nothing(workdir):
    write_lines(workdir / "metrics.jsonl", dead_run(30))
    writer = MetricsWriter(str(workdir))
    writer.truncate_after(-1)
    writer.write(0, {"eval/synthetic/box_hard": 2.0})
    writer.close()
    assert read_metrics(str(workdir)) == [{"step": 0, "eval/synthetic/box_hard": 2.0}]


def test_readers_keep_the_last_write_per_step(workdir):
    # The user's report: a dead run logged 0, 1, 1, 2, 3, 25, the rerun the same, then 40.
    first = [{"step": 0, "eval/synthetic/box_hard": 1.0}, {"step": 1, "perf/compile_time_sec": 9.0}]
    first += [{"step": s, "train/loss": 10.0 + s} for s in (1, 2, 3, 25)]
    first += [{"step": 30, "eval/synthetic/box_hard": 99.0}]  # past the rerun's end: stale
    rerun = [{**r, **{k: v / 10 for k, v in r.items() if k != "step"}} for r in first[:-1]]
    rerun += [{"step": 40, "train/loss": 0.5}, {"step": 40, "eval/synthetic/box_hard": 7.0}]
    write_lines(workdir / "metrics.jsonl", first + rerun)
    records = plots.read_run_metrics(str(workdir))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 25, 40]
    assert records[1] == {"step": 1, "perf/compile_time_sec": 0.9, "train/loss": 1.1}
    assert records[-1] == {"step": 40, "train/loss": 0.5, "eval/synthetic/box_hard": 7.0}
    assert plots.final_results(str(workdir)) == (40, {"synthetic": {"box_hard": 7.0}})
    assert compare.final_eval(str(workdir)) == (40, {"synthetic/box_hard": 7.0})
    # Same steps twice in one run's order (no step goes back): merged, the later value wins.
    merged = latest_per_step([{"step": 5, "a": 1.0}, {"step": 5, "a": 2.0, "b": 3.0}])
    assert merged == [{"step": 5, "a": 2.0, "b": 3.0}]


def test_curves_draw_each_step_once(workdir, monkeypatch):
    write_lines(workdir / "metrics.jsonl", dead_run(5) + dead_run(8))
    drawn = {}
    real = plots._series

    def spy(records, key):
        steps, values = real(records, key)
        drawn[key] = steps
        return steps, values

    monkeypatch.setattr(plots, "_series", spy)
    plots.write_curves(str(workdir), str(workdir / "curves.png"))
    assert drawn["train/loss"] == list(range(1, 9))
    assert (workdir / "curves.png").stat().st_size > 0
