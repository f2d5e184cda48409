"""Shared test setup: 8 simulated CPU devices, set before JAX starts its backend."""

import os
import tempfile

# Tests check numbers, not speed: XLA's backend optimisation level 0 compiles 2-3x faster on CPU.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Many tests compile the same small programs (the tiny model's train step, its encoders); a
# persistent compilation cache shared by the whole run compiles each once.
# A fresh directory per session: programs only come back within one run, never stale ones from an
# earlier run (loading a cached multi-device CPU program has been seen to hang its collectives).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="beta_clip_jax_xla_cache_")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
