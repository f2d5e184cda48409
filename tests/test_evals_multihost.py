"""Two local processes (jax.distributed on localhost, CPU collectives) evaluate an uneven dataset
(7 items, batch 2) and must report exactly the single-process numbers.

This file is also the worker: `python test_evals_multihost.py PID PORT DATA_DIR OUT_JSON`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_ITEMS = 7


def evaluate(data_dir):
    """Run the evaluators under test; returns (results, encoder calls, sharded_map check)."""
    from test_evals_fakes import ColourFake, IdFake

    from beta_clip_jax.evals.gather import sharded_map
    from beta_clip_jax.evals.registry import build_evaluators, run_evaluators

    cfg = {
        "urban": {"kind": "urban1k", "root": os.path.join(data_dir, "urban"), "batch_size": 2},
        "syn": {"kind": "synthetic", "num_examples": 5, "batch_size": 2},
    }
    evaluators = {e.name: e for e in build_evaluators(cfg)}
    fake = IdFake()
    results = run_evaluators([evaluators["urban"]], fake)
    results.update(run_evaluators([evaluators["syn"]], ColourFake()))
    rows = sharded_map(lambda idx: np.stack([idx, idx * 10], 1).astype(np.float32), NUM_ITEMS, 2)
    return results, fake.calls, rows.tolist()


def worker(pid, port, data_dir, out_path):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid
    )
    assert jax.process_count() == 2
    results, calls, rows = evaluate(data_dir)
    with open(out_path, "w") as f:
        json.dump({"results": results, "calls": calls, "rows": rows}, f)
    jax.distributed.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_shard_bounds_cover_every_item_once():
    from beta_clip_jax.evals.gather import shard_bounds

    for n in (1, 2, 7, 8, 13):
        for count in (1, 2, 3, 8):
            covered = []
            for pid in range(count):
                start, length = shard_bounds(n, pid, count)
                assert length == -(-n // count)
                covered += [i for i in range(start, start + length) if i < n]
            assert covered == list(range(n))


def test_two_processes_equal_one(tmp_path):
    from test_evals_datasets import make_urban1k

    make_urban1k(str(tmp_path / "urban"), list(range(1, NUM_ITEMS + 1)))
    single, single_calls, rows = evaluate(str(tmp_path))
    assert rows == [[i, 10 * i] for i in range(NUM_ITEMS)]

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    port = _free_port()
    outs = [str(tmp_path / f"out{p}.json") for p in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(p), str(port), str(tmp_path), outs[p]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for p in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=60)[0].decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    per_process = [json.load(open(o)) for o in outs]
    for got in per_process:
        assert got["rows"] == rows  # every row once, in order, padding dropped
        assert got["results"].keys() == single.keys()
        for name in single:
            assert got["results"][name] == single[name], name
    # Both processes made the same calls with the same shapes (collectives line up): ceil(7/2)=4
    # items each -> 2 batches of 2 per pass.
    assert per_process[0]["calls"] == per_process[1]["calls"]
    assert all(n == 2 for _, n in per_process[0]["calls"])
    assert len(per_process[0]["calls"]) < len(single_calls)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
