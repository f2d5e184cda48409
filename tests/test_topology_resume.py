"""Resume on another topology: a run stopped on 2 processes resumes on 1 (and 1 on 2) and ends
with the parameters of an uninterrupted 1-process run; the 2-process run's data counters are
both processes' together (summed in the step), equal to the 1-process run's.

Every run is the CLI on the tiny config with 2 devices in all (2 processes x 1 device through
launch/local_cluster.sh, or 1 process x 2 devices), reading a small JSONL with broken records.
"""

import sys

import numpy as np
import pytest
from test_data_sources import make_jsonl
from test_multihost_train import (
    CONFIG,
    REPO,
    _assert_ok,
    _env,
    _finish,
    _popen,
    _records,
    _stop,
    cluster_command,
    one_process_env,
)

from beta_clip_jax import checkpoint
from beta_clip_jax.step import abstract_params

NUM_STEPS, STOP_AT = 12, 6
BAD = {5: "missing_image", 21: "corrupt_image", 40: "empty_caption"}


def _args(data_path, workdir, stop_at=0):
    return [
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        f"--config.num_steps={NUM_STEPS}",
        "--config.checkpoint_every=3",
        f"--config.stop_at_step={stop_at}",
        "--config.data.name=jsonl",
        f"--config.data.path={data_path}",
        "--config.data.max_skip_fraction=0.5",
    ]


def _start(processes, data_path, workdir, stop_at=0):
    args = _args(data_path, workdir, stop_at)
    log = f"{workdir}.{processes}proc"
    if processes == 1:
        env, cmd = one_process_env(2), [sys.executable, "-m", "beta_clip_jax.main", *args]
    else:
        env, cmd = _env(), cluster_command(f"{log}_logs", args, processes)
    return _popen(cmd, env, type(REPO)(f"{log}.txt"))


def _at_step(records, step, prefix):
    out = {}
    for r in records:
        if r["step"] == step:
            out.update({k: v for k, v in r.items() if k.startswith(prefix)})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("topology")
    data_path, _ = make_jsonl(str(root / "data"), n=64, bad=BAD)
    paths = {name: str(root / name) for name in ("reference", "two_then_one", "one_then_two")}
    procs = {}
    try:
        procs["reference"] = _start(1, data_path, paths["reference"])
        procs["first_two"] = _start(2, data_path, paths["two_then_one"], STOP_AT)
        procs["first_one"] = _start(1, data_path, paths["one_then_two"], STOP_AT)
        results = {name: _finish(procs[name]) for name in ("first_two", "first_one")}
        records = {name: _records(paths[w]) for name, w in
                   (("first_two", "two_then_one"), ("first_one", "one_then_two"))}  # fmt: skip
        procs["then_one"] = _start(1, data_path, paths["two_then_one"])
        procs["then_two"] = _start(2, data_path, paths["one_then_two"])
        for name in ("then_one", "then_two", "reference"):
            results[name] = _finish(procs[name])
    finally:
        for proc in procs.values():
            _stop(proc)
    return paths, results, records


@pytest.mark.parametrize(
    "workdir, first, then",
    [("two_then_one", "first_two", "then_one"), ("one_then_two", "first_one", "then_two")],
)
def test_resume_on_another_process_count_matches_the_uninterrupted_run(runs, workdir, first, then):
    paths, results, _ = runs
    for name in (first, then, "reference"):
        _assert_ok(results[name])
    reference, _, ref_step = checkpoint.load_params_from_workdir(
        paths["reference"], abstract_params
    )
    resumed, _, step = checkpoint.load_params_from_workdir(paths[workdir], abstract_params)
    assert step == ref_step == NUM_STEPS
    for (path, a), b in zip(jax_tree_with_path(reference), jax_tree_leaves(resumed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=path)


def test_two_processes_count_every_broken_record_once(runs):
    """Both processes' counters, summed by the step, equal the 1-process run's: the distinct
    broken records by reason, the truncated texts. records_seen is each process's distinct
    records added up, so a record both read (a bad slot's replacement drawn where the other
    process also read) counts twice: at most one per replacement."""
    paths, results, records = runs
    _assert_ok(results["reference"])
    one = _at_step(_records(paths["reference"]), STOP_AT, "data/")
    two = _at_step(records["first_two"], STOP_AT, "data/")
    seen_one, seen_two = one.pop("data/records_seen"), two.pop("data/records_seen")
    assert two == one
    skipped = sum(v for k, v in one.items() if k.startswith("data/skipped_"))
    assert skipped >= 1  # broken records were met (the comparison above is not of zeros)
    assert seen_one <= seen_two <= seen_one + skipped


def jax_tree_with_path(tree):
    import jax

    return [
        (jax.tree_util.keystr(p), np.asarray(v))
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def jax_tree_leaves(tree):
    import jax

    return [np.asarray(v) for v in jax.tree.leaves(tree)]
