"""The machine: device peak table, measured matmul peak, machine info, cost and memory readers."""

from __future__ import annotations

import os
import platform
import resource

import jax
import psutil

# The peaks and FLOP readers live with the training logs' MFU; the bench re-exports them.
from beta_clip_jax.perf import (  # noqa: F401
    DEVICE_PEAKS,
    cost,
    device_peak,
    measured_matmul_tflops,
    table_peak,
    time_calls,
)


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
