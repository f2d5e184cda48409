"""The training loop holds no per-step host collective: the only cross-process call it makes
each step is JAX's preemption sync point, which reads a local flag until a notice arrives.
Checked on the source (a 2-process run cannot show what it does not do): every call inside the
loop over steps in train.train_and_evaluate, and every helper it calls each step."""

import ast
import inspect
import textwrap

from beta_clip_jax import train

# Cross-process exchanges of the host: none may run each step.
HOST_COLLECTIVES = {
    "process_allgather",
    "sync_global_devices",
    "broadcast_one_to_all",
    "host_local_array_to_global_array",
    "_gather_json",
    "_all_processes_agree",
}
# Called each step but not a collective until a preemption notice (or a save, or a log step).
PER_STEP_ALLOWED = {"reached_preemption_sync_point"}


def _calls(node) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


def _step_loop():
    tree = ast.parse(inspect.getsource(train.train_and_evaluate))
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
    (loop,) = [
        n for n in loops if "range" in ast.unparse(n.iter) and "num_steps" in ast.unparse(n.iter)
    ]
    return loop


def _source_calls(fn) -> set[str]:
    return _calls(ast.parse(textwrap.dedent(inspect.getsource(fn))))


def test_the_step_loop_calls_no_host_collective():
    calls = _calls(_step_loop())
    assert "agreed" in calls and "_counter_rows" in calls  # the helpers checked below
    assert not calls & HOST_COLLECTIVES
    for helper in (train._Preemption.agreed, train._counter_rows, train._check_finite):
        assert not _source_calls(helper) & HOST_COLLECTIVES, helper.__qualname__
    # The preemption check is the sync point, which talks to other processes only once a
    # notice arrived (an allgather of the flag each step was what it replaced).
    assert _source_calls(train._Preemption.agreed) & PER_STEP_ALLOWED
