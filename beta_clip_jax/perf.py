"""FLOPs of the train step, device peaks and MFU, shared by the training logs and the bench.

XLA's cost analysis counts the body of a loop once, so a step whose layers are scanned
(model.scan_layers) is counted on its unrolled twin (same parameters, same batch), lowered but
not compiled; the micro-batch loop of gradient accumulation is counted as `grad_accum` bodies
(which counts the optimiser update that many times too: well under 0.1 % of a CLIP step).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense per-chip peaks, TFLOP/s, first match on jax's device_kind. "float32" is the rate of XLA's
# default precision for f32 dots: TF32 tensor cores on NVIDIA Ampere/Hopper, bf16 passes on TPU.
DEVICE_PEAKS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.7}),
    ("H200", {"bfloat16": 989.0, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),  # v5p
    ("TPU v6", {"bfloat16": 918.0, "float32": 918.0}),  # v6e (Trillium)
)


def cost(compiled_or_lowered) -> dict:
    """flops, transcendentals and bytes accessed from XLA's cost analysis."""
    ca = compiled_or_lowered.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {k: float(ca.get(k, 0.0)) for k in ("flops", "transcendentals", "bytes accessed")}


def time_calls(fn, args, steps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def measured_matmul_tflops(dtype: str, n: int = 2048, reps: int = 5) -> float:
    """Best of a few n x n x n matmuls on the first device (the CPU 'peak')."""
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    best = min(time_calls(f, (x, x), reps))
    return 2 * n**3 / best / 1e12


def table_peak(device_kind: str, dtype: str) -> tuple[float, str] | None:
    """The DEVICE_PEAKS entry for a jax device_kind, or None."""
    for name, peaks in DEVICE_PEAKS:
        if name.lower() in device_kind.lower():
            return peaks[dtype], f"table ({name} dense {dtype})"
    return None


def device_peak(dtype: str, override: float = 0.0, matmul_size: int = 2048) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from): the override, the table, else measured."""
    if override > 0:
        return override, "peak_tflops as given"
    kind = jax.devices()[0].device_kind
    return table_peak(kind, dtype) or (
        measured_matmul_tflops(dtype, n=matmul_size),
        f"measured {dtype} {matmul_size}^3 matmul on {kind}",
    )


def train_step_flops(config, tx, mesh, state, batch) -> tuple[float, str]:
    """(FLOPs of one train step, all devices together, how they were counted).

    The count is XLA's for the step before it is partitioned over the mesh, so it is the same on
    any mesh (a partitioned program also counts the work each device repeats) and includes the
    recomputation that remat asks for. `state` and `batch` may be arrays or ShapeDtypeStructs
    with shardings.
    """
    from beta_clip_jax import step as step_lib
    from beta_clip_jax.methods import build_model

    accum = int(config.optim.get("grad_accum", 1))
    twin = config.copy_and_resolve_references()
    twin.model.scan_layers = False  # the same parameter tree, layers unrolled
    shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.opt_state))
    jitted = step_lib.jit_train_step(build_model(twin.model), tx, twin, mesh, *shardings)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (state, batch)
    )
    with jax.set_mesh(mesh):
        flops = cost(jitted.lower(*abstract))["flops"]
    source = "XLA's count of the unpartitioned step, layers unrolled"
    if accum > 1:
        flops *= accum
        source += f", x{accum} micro-batches"
    return flops, source


def utilization(
    flops_per_step: float, step_seconds: float, devices: int, peak: float, shared_peak: bool
) -> dict:
    """perf/tflops_per_device and perf/mfu for a step of `flops_per_step` (all devices).

    shared_peak: the peak was measured on a CPU whose cores every simulated device shares, so
    MFU compares the whole mesh's rate with it."""
    per_device = flops_per_step / max(step_seconds, 1e-12) / devices / 1e12
    basis = per_device * devices if shared_peak else per_device
    return {"perf/tflops_per_device": per_device, "perf/mfu": basis / peak if peak else 0.0}
