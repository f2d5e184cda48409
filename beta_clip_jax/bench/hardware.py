"""The machine: device peak table, measured matmul peak, machine info, cost and memory readers."""

from __future__ import annotations

import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import psutil

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


def cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {k: float(ca.get(k, 0.0)) for k in ("flops", "transcendentals", "bytes accessed")}


def memory(compiled) -> dict:
    """Compiled per-device sizes; peak estimate = arguments + outputs - aliased + temporaries."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    out = {
        f"{name}_bytes": int(getattr(ma, f"{name}_size_in_bytes", 0))
        for name in ("argument", "output", "alias", "temp", "generated_code")
    }
    out["peak_estimate_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def process_memory() -> dict:
    out = {
        "rss_bytes": psutil.Process().memory_info().rss,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    stats = jax.local_devices()[0].memory_stats() or {}
    for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
        if key in stats:
            out[f"device_{key}"] = int(stats[key])
    return out


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


def device_peak(dtype: str, override: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from)."""
    if override > 0:
        return override, "--peak_tflops"
    kind = jax.devices()[0].device_kind
    return table_peak(kind, dtype) or (
        measured_matmul_tflops(dtype),
        f"measured {dtype} 2048^3 matmul on {kind}",
    )


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "devices": jax.device_count(),
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "jax": jax.__version__,
        "compilation_cache": jax.config.jax_compilation_cache_dir,
    }
