"""Train-step benchmark: speed, FLOPs, MFU, memory, input pipeline, and where the time goes.

    python -m beta_clip_jax.bench --variant=B/16 --batch=4 --texts_per_image=36 \
        [--mesh.data=-1 --mesh.fsdp=1] [--dtype=bfloat16] [--remat=full] [--scan_layers] \
        [--steps=5] [--breakdown] [--json=out.json]
    python -m beta_clip_jax.bench --config=configs/NAME.py [--config.FIELD=VALUE ...] [--steps=5]

Times the jitted, sharded train step of step.py (the trainer's own) after compiling it, on random
inputs with the batch layout of docs/CONTRACTS.md (every text slot full length and valid: the
worst case). FLOPs come from XLA's cost analysis of the compiled step; XLA counts a scanned loop
body once, so with scanned layers they are read from an unrolled twin of the step (compiled, never
run). MFU = achieved FLOP/s per device / the device's peak (DEVICE_PEAKS; on CPU a measured
matmul rate). --breakdown also jits the towers, the pooler, the loss (β-CAL + global InfoNCE) and
the optimiser update alone with the step's shapes and reports their time and FLOP shares, plus a
FLOP-only sweep over texts per image and β-CAL group size. Prints a table and one JSON object
(also written to --json). For several simulated CPU devices (FSDP on CPU) set
XLA_FLAGS=--xla_force_host_platform_device_count=N first. docs/bench.md has measured figures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import psutil
from absl import app, flags
from ml_collections import config_flags

from beta_clip_jax import config_check, objective, sharding
from beta_clip_jax import step as step_lib
from beta_clip_jax.config_defaults import base_config
from beta_clip_jax.data.transforms import normalize
from beta_clip_jax.models.clip import build_model
from beta_clip_jax.models.variants import num_patches
from beta_clip_jax.optim import make_optimizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default: base_config).")
_MESH = config_flags.DEFINE_config_dict(
    "mesh", ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "num_devices": 0})
)
_VARIANT = flags.DEFINE_string("variant", None, "Model variant (default B/16).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default 4).")
_K = flags.DEFINE_integer("texts_per_image", None, "K = 1 caption + sentences + phrases (36).")
_TEXT_LEN = flags.DEFINE_integer("text_length", None, "Caption/sentence tokens (248).")
_PHRASE_LEN = flags.DEFINE_integer("phrase_length", None, "Phrase tokens (30).")
_GROUP = flags.DEFINE_integer("group_size", None, "β-CAL group (default min(batch, 64)).")
_SCOPE = flags.DEFINE_enum("cal_scope", None, ["group", "global"], "β-CAL negatives.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Matmul compute dtype.")
_REMAT = flags.DEFINE_enum("remat", None, ["none", "dots", "full"], "Rematerialisation.")
_SCAN = flags.DEFINE_bool("scan_layers", None, "nn.scan over layers (--noscan_layers: unroll).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after --warmup).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Time towers / pooler / loss / optimiser.")
_SWEEP_K = flags.DEFINE_list("sweep_k", ["1", "6", "36"], "Breakdown FLOP sweep: K values.")
_SWEEP_G = flags.DEFINE_list("sweep_groups", ["16", "64", "256"], "Breakdown sweep: groups.")
_PIPELINE = flags.DEFINE_bool("pipeline", True, "Also measure the input pipeline's images/s.")
_PIPE_BATCH = flags.DEFINE_integer("pipeline_batch", 16, "Pipeline batch size.")
_PIPE_BATCHES = flags.DEFINE_integer("pipeline_batches", 4, "Timed pipeline batches.")
_PIPE_WORKERS = flags.DEFINE_integer("pipeline_workers", 0, "grain worker processes.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s (0: table or measured).")
_JSON = flags.DEFINE_string("json", None, "Write the result JSON here.")

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


def bench_config(base=None, *, variant=None, batch=None, k=None, text_length=None,
                 phrase_length=None, group_size=None, cal_scope=None, dtype=None, remat=None,
                 scan_layers=None, mesh=None):  # fmt: skip
    """The benchmarked config: `base` (default base_config(variant)) with the given overrides."""
    c = base if base is not None else base_config(variant or "B/16")
    c = c.copy_and_resolve_references()
    if base is not None and variant:
        c.model.variant = variant
    if batch or base is None:
        c.batch_size = int(batch or 4)
    if k or base is None:
        k = int(k or 36)
        c.data.max_sentences = min(5, k - 1)
        c.data.max_phrases = k - 1 - c.data.max_sentences
    for field, value in (("text_length", text_length), ("phrase_length", phrase_length)):
        if value:
            c.data[field] = int(value)
    for field, value in (("dtype", dtype), ("remat", remat), ("scan_layers", scan_layers)):
        if value is not None:
            c.model[field] = value
    if cal_scope:
        c.loss.cal_scope = cal_scope
    if group_size or base is None:
        c.loss.group_size = int(group_size or math.gcd(c.batch_size, 64))
    if mesh is not None:
        c.mesh = ml_collections.ConfigDict(dict(mesh))
    return config_check.resolve_config(c)


def texts_per_image(config) -> int:
    return 1 + int(config.data.max_sentences) + int(config.data.max_phrases)


def synthetic_batch(config, batch: int, seed: int = 0) -> dict:
    """Random uint8 images and full-length token rows (SOT ... EOT), every slot valid."""
    rng = np.random.default_rng(seed)
    (s, ls), (kp, lp) = step_lib.text_shapes(config)
    size = step_lib.image_size(config)

    def tokens(slots, length):
        t = rng.integers(1, 49406, (batch, slots, length), dtype=np.int32)
        if length:
            t[..., 0], t[..., -1] = 49406, 49407
        return t

    return {
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "sentences": tokens(s, ls),
        "phrases": tokens(kp, lp),
        "valid": np.ones((batch, s + kp), bool),
    }


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


class Setup:
    """Model, optimiser, mesh, sharded state and batch for one config."""

    def __init__(self, config):
        self.config = config
        config_check.check_config(config, sharding.mesh_device_count(config.mesh), 1)
        self.mesh = sharding.make_mesh(config.mesh)
        self.model = build_model(config.model)
        self.tx, _ = make_optimizer(config.optim, 1000, int(config.model.frozen_positions))
        _, self.params_sh, _, self.opt_sh = step_lib.state_shardings(
            self.model, self.tx, config, self.mesh
        )
        self.jitted = step_lib.jit_train_step(
            self.model, self.tx, config, self.mesh, self.params_sh, self.opt_sh
        )
        local = synthetic_batch(config, int(config.batch_size))
        self.batch = sharding.global_batch_from_local(local, self.mesh)

    def abstract_state(self):
        params, opt = step_lib.state_shardings(self.model, self.tx, self.config, self.mesh)[::2]
        sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        return step_lib.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(self.mesh)),
            params=jax.tree.map(sds, params, self.params_sh),
            opt_state=jax.tree.map(sds, opt, self.opt_sh),
        )

    def init_state(self):
        params, opt = step_lib.init_state(
            self.model, self.tx, self.config, self.mesh, self.params_sh, self.opt_sh
        )
        step = jax.device_put(np.int32(0), sharding.replicated(self.mesh))
        return step_lib.TrainState(step=step, params=params, opt_state=opt)


def unrolled(config):
    c = config.copy_and_resolve_references()
    c.model.scan_layers = False
    return c


def step_flops(config, setup) -> tuple[dict, str]:
    """FLOPs of the compiled step; from an unrolled twin when layers are scanned."""
    if not config.model.scan_layers:
        return None, "compiled step"
    twin = Setup(unrolled(config))
    with jax.set_mesh(twin.mesh):
        compiled = twin.jitted.lower(twin.abstract_state(), twin.batch).compile()
    return cost(compiled), "compiled unrolled twin of the step (scan bodies count once)"


def bench_step(config, steps: int, warmup: int, peak: tuple[float, str] | None = None):
    s = Setup(config)
    state = s.init_state()
    with jax.set_mesh(s.mesh):
        t0 = time.perf_counter()
        lowered = s.jitted.lower(state, s.batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        logging.info("compiled the step in %.1f s; running %d + %d steps", t2 - t1, warmup, steps)
        for _ in range(warmup):
            state, metrics = compiled(state, s.batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, s.batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t)
            logging.info("step %.2f s", times[-1])
    own = cost(compiled)
    counted, source = step_flops(config, s)
    flops = (counted or own)["flops"]
    step_s = statistics.median(times)
    b, k = int(config.batch_size), texts_per_image(config)
    ndev = s.mesh.size
    peak, peak_source = peak or device_peak(config.model.dtype)
    if peak_source.startswith("measured"):
        # The CPU may be shared: measure again after the step and keep the better figure.
        peak = max(peak, measured_matmul_tflops(config.model.dtype))
        peak_source += " (best of before and after the step)"
    # Simulated CPU devices share the measured cores: compare the whole mesh with the CPU's peak.
    mfu_devices = ndev if peak_source.startswith("measured") else 1
    per_dev = flops / step_s / 1e12
    result = {
        "compile": {"lower_s": t1 - t0, "compile_s": t2 - t1},
        "step": {
            "median_s": step_s,
            "times_s": times,
            "examples_per_s": b / step_s,
            "pairs_per_s": b * k / step_s,
            "loss": float(metrics["loss"]),
        },
        "flops": {
            "per_step_per_device": flops,
            "per_example": flops * ndev / b,
            "compiled_step_own": own["flops"],
            "source": source,
            "achieved_tflops_per_device": per_dev,
            "achieved_tflops_total": per_dev * ndev,
            "peak_tflops_per_device": peak,
            "peak_source": peak_source,
            "mfu": per_dev * mfu_devices / peak,
            "mfu_basis": "whole CPU (all its devices)" if mfu_devices > 1 else "per device",
        },
        "memory": {**memory(compiled), **process_memory()},
    }
    return result, s, state


def _parts(model, loss_cfg):
    """value_and_grad of each piece of the step, differentiated as the step differentiates it."""

    def towers(p, rest, batch):
        params = {**rest, **p}
        apply = lambda x, method: model.apply({"params": params}, x, method=method)
        cls, patches = apply(normalize(batch["image"]), "encode_image")
        total = cls.sum() + patches.sum() + apply(batch["sentences"], "encode_text").sum()
        if batch["phrases"].shape[1]:
            total += apply(batch["phrases"], "encode_text").sum()
        return total

    def pooler(p, rest, text, patches):
        pooled, _ = model.apply({"params": {**rest, "pooler": p}}, text, patches, method="pool")
        return pooled.sum()

    def loss(outputs, valid):
        return objective.training_loss(outputs, valid, loss_cfg)[0]

    return {
        "towers": jax.value_and_grad(towers),
        "pooler": jax.value_and_grad(pooler, argnums=(0, 2, 3)),
        "loss": jax.value_and_grad(loss),
    }


def _part_args(params, batch, model_cfg, b, k, seed=0):
    """Arguments of each part for b images with K texts (random activations of the right shape)."""
    e, p = int(model_cfg.embed_dim), num_patches(model_cfg)
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    towers_p = {n: params[n] for n in ("visual", "text")}
    rest = {n: v for n, v in params.items() if n not in towers_p}
    no_pooler = {n: v for n, v in params.items() if n != "pooler"}
    outputs = {
        "image": f(b, e),
        "text": f(b, k, e),
        "pooled": f(b, k, e),
        "logit_scale": params["logit_scale"],
        "pooler_logit_scale": params["pooler"]["logit_scale"],
    }
    return {
        "towers": (towers_p, rest, batch),
        "pooler": (params["pooler"], no_pooler, f(b, k, e), f(b, p, e)),
        "loss": (outputs, jnp.ones((b, k), bool)),
    }


def breakdown(setup, state, steps: int) -> dict:
    """Time (this machine) and compiled FLOPs of towers, pooler, loss and optimiser update.

    Each part is jitted alone with the step's shapes and shardings; XLA fuses across parts in the
    real step, so the sum of parts is close to, not equal to, the step time.
    """
    config = setup.config
    b, k = int(config.batch_size), texts_per_image(config)
    count_model = build_model(unrolled(config).model) if config.model.scan_layers else None
    parts = _parts(setup.model, config.loss)
    count_parts = _parts(count_model, config.loss) if count_model else parts
    with jax.set_mesh(setup.mesh):
        args = _part_args(state.params, setup.batch, config.model, b, k)
        # Activations are split over the batch axes like the step's; parameters stay as they are.
        put = lambda x: jax.device_put(x, sharding.batch_sharding(setup.mesh))
        p_params, p_rest, text, patches = args["pooler"]
        args["pooler"] = (p_params, p_rest, put(text), put(patches))
        outputs, valid = args["loss"]
        outputs = {n: put(x) if n in ("image", "text", "pooled") else x for n, x in outputs.items()}
        args["loss"] = (outputs, put(valid))
        out = {}
        for name, fn in parts.items():
            logging.info("breakdown: %s", name)
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*args[name]).compile()
            compile_s = time.perf_counter() - t0
            counted = compiled
            if count_parts is not parts and name == "towers":
                counted = jax.jit(count_parts[name]).lower(*args[name]).compile()
            times = time_calls(compiled, args[name], steps)
            out[name] = {
                "median_s": statistics.median(times),
                "flops": cost(counted)["flops"],
                "compile_s": compile_s,
            }

        def update(grads, opt_state, params):
            updates, opt_state = setup.tx.update(grads, opt_state, params)
            params = objective.clamp_log_temperatures(optax.apply_updates(params, updates))
            return params, opt_state

        opt_args = (state.params, state.opt_state, state.params)
        compiled = jax.jit(update).lower(*opt_args).compile()
        times = time_calls(compiled, opt_args, steps)
        out["optimizer"] = {"median_s": statistics.median(times), "flops": cost(compiled)["flops"]}
    total_t = sum(p["median_s"] for p in out.values())
    total_f = sum(p["flops"] for p in out.values())
    for p in out.values():
        p["time_share"] = p["median_s"] / total_t
        p["flop_share"] = p["flops"] / total_f
    note = ""
    if config.loss.get("cal_scope", "group") == "global":
        note = "global β-CAL scans over blocks: XLA counts its loop bodies once (loss FLOPs low)"
    return {"parts": out, "sum_of_parts_s": total_t, "note": note}


def flop_sweep(config, ks, groups) -> list[dict]:
    """GFLOPs per image (forward + backward) of towers, pooler and grouped β-CAL for each K and
    group size G, from the lowered HLO with unrolled layers (nothing is compiled or run). Towers
    and pooler grow with K; β-CAL per image grows with G K^2 (logits are (G K)^2 per group)."""
    rows = []
    base = unrolled(config)
    model = build_model(base.model)
    tx, _ = make_optimizer(base.optim, 1000, int(base.model.frozen_positions))
    params = step_lib.abstract_state(model, tx, base)[0]
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(params))
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    for k in ks:
        logging.info("FLOP sweep: K=%d", k)
        c = bench_config(base, k=k, batch=1, group_size=1)
        batch = jax.tree.map(sds, synthetic_batch(c, 1))
        parts = _parts(model, c.loss)
        row = {"k": k}
        for name in ("towers", "pooler"):
            a = _part_args(params, batch, c.model, 1, k)[name]
            row[f"{name}_gflops"] = _lowered_flops(parts[name], a) / 1e9
        for g in groups:
            lc = c.loss.copy_and_resolve_references()
            lc.group_size, lc.cal_scope = g, "group"
            a = _part_args(params, batch, c.model, g, k)["loss"]
            loss_gflops = _lowered_flops(_parts(model, lc)["loss"], a) / g / 1e9
            total = row["towers_gflops"] + row["pooler_gflops"] + loss_gflops
            row[f"g{g}"] = {
                "loss_gflops": loss_gflops,
                "towers_share": row["towers_gflops"] / total,
                "pooler_share": row["pooler_gflops"] / total,
                "loss_share": loss_gflops / total,
            }
        rows.append(row)
    return rows


def _lowered_flops(fn, args) -> float:
    ca = jax.jit(fn).lower(*args).cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"])


def pipeline_throughput(config, batch_size: int, batches: int, workers: int, hw=(480, 640)):
    """data/throughput.py's measurement with this config's K and image size: JPEGs + synthetic."""
    from beta_clip_jax.data import pipeline, throughput

    cfg = pipeline.default_data_config()
    for field in ("max_sentences", "max_phrases", "text_length", "phrase_length"):
        cfg[field] = config.data[field]
    cfg.num_workers, cfg.max_skip_fraction = workers, 1.0
    size = step_lib.image_size(config)
    out = {"batch_size": batch_size, "num_workers": workers, "jpeg_hw": list(hw)}
    with tempfile.TemporaryDirectory() as tmp:
        real = cfg.copy_and_resolve_references()
        real.name = "jsonl"
        real.path = throughput.write_dataset(tmp, max(32, 2 * batch_size), tuple(hw))
        out["jpeg"] = throughput.measure(real, batch_size, batches, size)
    out["synthetic"] = throughput.measure(cfg, batch_size, batches, size)
    return out


def run(config, *, steps=5, warmup=1, with_breakdown=False, sweep_k=(), sweep_groups=(),
        pipeline=None, peak_tflops=0.0) -> dict:  # fmt: skip
    """The whole benchmark for one config; `pipeline` = kwargs of pipeline_throughput or None."""
    result = {"machine": machine()}
    peak = device_peak(config.model.dtype, peak_tflops)  # on CPU measured before the step too
    step_res, setup, state = bench_step(config, steps, warmup, peak)
    result["config"] = {
        "variant": config.model.variant,
        "batch": int(config.batch_size),
        "texts_per_image": texts_per_image(config),
        "text_length": int(config.data.text_length),
        "phrase_length": int(config.data.phrase_length),
        "group_size": int(config.loss.group_size),
        "cal_scope": config.loss.get("cal_scope", "group"),
        "dtype": config.model.dtype,
        "remat": config.model.remat,
        "scan_layers": bool(config.model.scan_layers),
        "mesh": dict(setup.mesh.shape),
    }
    result.update(step_res)
    if with_breakdown:
        result["breakdown"] = breakdown(setup, state, max(1, steps))
        result["breakdown"]["step_s"] = step_res["step"]["median_s"]
        if sweep_k:
            result["breakdown"]["sweep"] = flop_sweep(config, sweep_k, sweep_groups)
    del state
    if pipeline is not None:
        logging.info("input pipeline")
        pipe = pipeline_throughput(config, **pipeline)
        pipe["step_examples_per_s"] = step_res["step"]["examples_per_s"]
        result["pipeline"] = pipe
    result["memory"].update(process_memory())
    return result


def _gb(x) -> str:
    return f"{x / 2**30:.2f} GiB"


def format_table(r: dict) -> str:
    c, st, fl, mem = r["config"], r["step"], r["flops"], r["memory"]
    rows = [
        ("machine", f"{r['machine']['device_kind']} x{r['machine']['devices']}, "
                    f"{r['machine']['cpu']} ({r['machine']['cpu_cores']} cores)"),
        ("config", f"{c['variant']} batch {c['batch']} K {c['texts_per_image']} {c['dtype']} "
                   f"remat={c['remat']} scan={c['scan_layers']} mesh={c['mesh']} "
                   f"group={c['group_size']} scope={c['cal_scope']}"),
        ("compile", f"{r['compile']['compile_s']:.1f} s (+ lower {r['compile']['lower_s']:.1f} s)"),
        ("step (median)", f"{st['median_s'] * 1e3:.1f} ms"),
        ("examples/s", f"{st['examples_per_s']:.3f}"),
        ("text-image pairs/s", f"{st['pairs_per_s']:.2f}"),
        ("FLOPs / example", f"{fl['per_example'] / 1e9:.1f} GFLOP ({fl['source']})"),
        ("achieved", f"{fl['achieved_tflops_per_device'] * 1e3:.1f} GFLOP/s per device"),
        ("peak", f"{fl['peak_tflops_per_device'] * 1e3:.1f} GFLOP/s ({fl['peak_source']})"),
        ("MFU", f"{100 * fl['mfu']:.1f} %"),
        ("memory (compiled)", f"peak est. {_gb(mem.get('peak_estimate_bytes', 0))}, temp "
                              f"{_gb(mem.get('temp_bytes', 0))}, args "
                              f"{_gb(mem.get('argument_bytes', 0))}"),
        ("process RSS", f"{_gb(mem['rss_bytes'])} (max {_gb(mem['max_rss_bytes'])})"),
    ]  # fmt: skip
    if "device_peak_bytes_in_use" in mem:
        rows.append(("device peak in use", _gb(mem["device_peak_bytes_in_use"])))
    if "pipeline" in r:
        p = r["pipeline"]
        rows.append(("pipeline images/s", f"JPEG {p['jpeg']['images_per_sec']}, synthetic "
                                          f"{p['synthetic']['images_per_sec']}"))  # fmt: skip
    if "breakdown" in r:
        for name, part in r["breakdown"]["parts"].items():
            rows.append((f"  {name}", f"{part['median_s'] * 1e3:.1f} ms "
                                      f"({100 * part['time_share']:.1f} % time, "
                                      f"{100 * part['flop_share']:.1f} % FLOPs)"))  # fmt: skip
        for row in r["breakdown"].get("sweep", []):
            shares = ", ".join(
                f"G={key[1:]}: pooler {100 * v['pooler_share']:.1f} % / β-CAL "
                f"{100 * v['loss_share']:.2f} %"
                for key, v in row.items()
                if key.startswith("g")
            )
            rows.append((f"  K={row['k']} FLOPs", f"towers {row['towers_gflops']:.1f} GF/img; "
                                                  f"{shares}"))  # fmt: skip
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = bench_config(
        _CONFIG.value,
        variant=_VARIANT.value,
        batch=_BATCH.value,
        k=_K.value,
        text_length=_TEXT_LEN.value,
        phrase_length=_PHRASE_LEN.value,
        group_size=_GROUP.value,
        cal_scope=_SCOPE.value,
        dtype=_DTYPE.value,
        remat=_REMAT.value,
        scan_layers=_SCAN.value,
        mesh=_MESH.value,
    )
    pipe = None
    if _PIPELINE.value:
        pipe = {
            "batch_size": _PIPE_BATCH.value,
            "batches": _PIPE_BATCHES.value,
            "workers": _PIPE_WORKERS.value,
        }
    result = run(
        config,
        steps=_STEPS.value,
        warmup=_WARMUP.value,
        with_breakdown=_BREAKDOWN.value,
        sweep_k=[int(x) for x in _SWEEP_K.value] if _BREAKDOWN.value else (),
        sweep_groups=[int(x) for x in _SWEEP_G.value],
        pipeline=pipe,
        peak_tflops=_PEAK.value,
    )
    print(format_table(result))
    text = json.dumps(result, indent=1)
    print(text)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
