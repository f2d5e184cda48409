"""Multi-process start-up: initialise `jax.distributed` when the environment asks for it.

Call `maybe_initialize()` first thing in a program, before any JAX computation (and after any
`jax.config.update` that must precede the backend, such as `jax_num_cpu_devices`). The same
command then runs unchanged on one host, on a Cloud TPU pod (`--worker=all`), under SLURM
(`srun`) and as N local CPU processes (`launch/local_cluster.sh`).

How the environment asks, first match wins:

1. `BETA_CLIP_DISTRIBUTED=0` (or `off`): never initialise; a single-process run.
2. Explicit: `BETA_CLIP_COORDINATOR` (host:port of process 0), `BETA_CLIP_NUM_PROCESSES`,
   `BETA_CLIP_PROCESS_ID`, optionally `BETA_CLIP_LOCAL_DEVICE_IDS` ("0,1").
3. `BETA_CLIP_DISTRIBUTED=1` (or `on`): JAX's own cluster auto-detection, whatever the cluster
   (Open MPI, Kubernetes, a one-task SLURM job, ...).
4. SLURM with more than one task (`srun`): JAX's SLURM detection.
5. A Cloud TPU VM (libtpu installed and TPU chips present): JAX's Cloud TPU detection, which asks
   the metadata server for the workers; a one-host slice becomes a one-process cluster.
6. Otherwise nothing happens: a single process.

`BETA_CLIP_INIT_TIMEOUT` (seconds, default 300) bounds the wait for the other processes.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax
from absl import logging

ENV_MODE = "BETA_CLIP_DISTRIBUTED"
ENV_COORDINATOR = "BETA_CLIP_COORDINATOR"
ENV_NUM_PROCESSES = "BETA_CLIP_NUM_PROCESSES"
ENV_PROCESS_ID = "BETA_CLIP_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "BETA_CLIP_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "BETA_CLIP_INIT_TIMEOUT"

_EXPLICIT = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


def detect(environ: dict[str, str] | None = None) -> str | None:
    """Names the way this process should join a cluster, or None for a single process.

    One of "explicit", "forced", "slurm", "cloud_tpu", or None; reads only the environment and
    the file system, never the network, so it is cheap and safe to call anywhere.
    """
    env = os.environ if environ is None else environ
    mode = env.get(ENV_MODE, "auto").strip().lower()
    if mode not in _ON + _OFF + ("auto", ""):
        raise ValueError(f"{ENV_MODE}={env[ENV_MODE]!r}: expected 0, 1 or auto.")
    if mode in _OFF:
        return None
    present = [name for name in _EXPLICIT if env.get(name)]
    if present and len(present) < len(_EXPLICIT):
        missing = [name for name in _EXPLICIT if name not in present]
        raise ValueError(
            f"Multi-process run half configured: {', '.join(present)} set but "
            f"{', '.join(missing)} missing. Set all of {', '.join(_EXPLICIT)} or none."
        )
    if present:
        return "explicit"
    if mode in _ON:
        return "forced"
    if all(env.get(name) for name in _SLURM) and _int(env, "SLURM_NTASKS") > 1:
        return "slurm"
    if _on_cloud_tpu_vm(env):
        return "cloud_tpu"
    return None


def maybe_initialize() -> tuple[int, int]:
    """Joins the cluster the environment describes; returns (process_index, process_count).

    Idempotent: later calls return the same numbers. With no cluster in the environment this
    is a no-op that returns (0, 1) without starting a JAX backend.
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    how = detect()
    if how is None:
        return 0, 1

    kwargs: dict = {"initialization_timeout": _int(os.environ, ENV_INIT_TIMEOUT, 300)}
    if os.environ.get(ENV_LOCAL_DEVICE_IDS):
        kwargs["local_device_ids"] = _device_ids(os.environ[ENV_LOCAL_DEVICE_IDS])
    if how == "explicit":
        num_processes = _int(os.environ, ENV_NUM_PROCESSES)
        process_id = _int(os.environ, ENV_PROCESS_ID)
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"{ENV_PROCESS_ID}={process_id} must lie in [0, {ENV_NUM_PROCESSES}="
                f"{num_processes})."
            )
        kwargs.update(
            coordinator_address=os.environ[ENV_COORDINATOR],
            num_processes=num_processes,
            process_id=process_id,
        )
        # All given: keep JAX from also probing SLURM or the TPU metadata server.
        kwargs.setdefault("cluster_detection_method", "deactivate")
    elif how == "slurm":
        kwargs["cluster_detection_method"] = "slurm"

    # CPU processes need a cross-process collectives backend; without one every multi-process
    # CPU computation fails ("Multiprocess computations aren't implemented on the CPU
    # backend"). gloo is jax 0.10's default, but older releases defaulted to none. The setting
    # only affects the CPU client, so it is harmless on GPU and TPU.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    logging.info("Starting jax.distributed (%s): %s", how, kwargs)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "before any JAX calls" in str(e):
            raise RuntimeError(
                "beta_clip_jax.distributed.maybe_initialize() must run before any JAX "
                "computation or device query in this process."
            ) from e
        raise
    index, count = jax.process_index(), jax.process_count()
    logging.info(
        "Process %d of %d: %d local / %d global devices.",
        index,
        count,
        jax.local_device_count(),
        jax.device_count(),
    )
    return index, count


def _on_cloud_tpu_vm(env) -> bool:
    """True on a Cloud TPU VM: libtpu importable and TPU chips visible to this host."""
    if env.get("TPU_SKIP_MDS_QUERY"):  # Set by JAX when it found no chips, or by the user.
        return False
    if importlib.util.find_spec("libtpu") is None and not env.get("TPU_LIBRARY_PATH"):
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _int(env, name: str, default: int | None = None) -> int:
    value = env.get(name, "")
    if value == "" and default is not None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer.") from None


def _device_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"{ENV_LOCAL_DEVICE_IDS}={text!r}: expected comma-separated integers."
        ) from None
