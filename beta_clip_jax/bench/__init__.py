"""Train-step benchmark: speed, FLOPs, MFU, memory, input pipeline, and where the time goes.

    python -m beta_clip_jax.bench --variant=B/16 --batch=4 --texts_per_image=36 \
        [--mesh.data=-1 --mesh.fsdp=1] [--dtype=bfloat16] [--remat=full] [--scan_layers] \
        [--attention=auto|xla|cudnn] [--steps=5] [--breakdown] [--json=out.json]
    python -m beta_clip_jax.bench --config=configs/NAME.py [--config.FIELD=VALUE ...] [--steps=5]

Times the jitted, sharded train step of step.py after compiling it, built by train_setup.TrainSetup
as the trainer builds it (the optimiser on the config's num_steps schedule, the pooler's starting
at loss.cal_start_step; the bench has no data to count a recipe's num_epochs in), on random inputs
with the batch layout of docs/CONTRACTS.md (every text slot full length and valid: the worst case).
FLOPs come from XLA's cost analysis of the compiled step; XLA counts a scanned loop body once, so
with scanned layers they are read from an unrolled twin of the step (compiled, never run). MFU =
achieved FLOP/s per device / the device's peak (DEVICE_PEAKS; on CPU a measured matmul rate).
--breakdown also jits the towers, the pooler, the loss (β-CAL + global InfoNCE) and the optimiser
update alone with the step's shapes and reports their time and FLOP shares, plus a FLOP-only sweep
over texts per image and β-CAL group size. Prints a table and one JSON object (also written to
--json). For several simulated CPU devices (FSDP on CPU) set
XLA_FLAGS=--xla_force_host_platform_device_count=N first. docs/bench.md has measured figures.

Modules: hardware (device peaks, machine, cost and memory readers), step_timing (config, batch,
Setup, FLOP counting, the timed step), parts (towers / pooler / loss / optimiser breakdown and
the FLOP sweep), report (run, input pipeline, table), __main__ (the command and its flags;
importing this package defines no flags).
"""

from beta_clip_jax.bench.hardware import (
    DEVICE_PEAKS,
    cost,
    device_peak,
    machine,
    measured_matmul_tflops,
    memory,
    process_memory,
    table_peak,
    time_calls,
)
from beta_clip_jax.bench.parts import breakdown, flop_sweep
from beta_clip_jax.bench.report import format_table, pipeline_throughput, run
from beta_clip_jax.bench.step_timing import (
    Setup,
    bench_config,
    bench_step,
    step_flops,
    texts_per_image,
    unrolled,
)

__all__ = [
    "DEVICE_PEAKS",
    "Setup",
    "bench_config",
    "bench_step",
    "breakdown",
    "cost",
    "device_peak",
    "flop_sweep",
    "format_table",
    "machine",
    "measured_matmul_tflops",
    "memory",
    "pipeline_throughput",
    "process_memory",
    "run",
    "step_flops",
    "table_peak",
    "texts_per_image",
    "time_calls",
    "unrolled",
]
