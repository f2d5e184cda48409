"""The benchmarked config, its synthetic batch and sharded state, FLOP counting, the timed step."""

from __future__ import annotations

import logging
import math
import statistics
import time

import jax
import ml_collections

from beta_clip_jax import config_check, sharding, train_setup
from beta_clip_jax.bench import batches
from beta_clip_jax.bench.hardware import (
    cost,
    device_peak,
    measured_matmul_tflops,
    memory,
    process_memory,
)
from beta_clip_jax.config_defaults import base_config


def bench_config(
    base=None,
    *,
    variant=None,
    batch=None,
    k=None,
    text_length=None,
    phrase_length=None,
    pack_texts=None,
    pack_group=None,
    group_size=None,
    cal_scope=None,
    dtype=None,
    remat=None,
    scan_layers=None,
    attention=None,
    mesh=None,
):
    """The benchmarked config: `base` (default base_config(variant)) with the given overrides.

    `attention` ("auto" | "xla" | "cudnn", None: keep the config's) sets model.attention; cudnn
    needs dtype bfloat16 (checked here, when the model config resolves) and a GPU (checked by
    Setup's config_check), both before anything compiles.
    """
    c = base if base is not None else base_config(variant or "B/16")
    c = c.copy_and_resolve_references()
    # The bench makes its own batch and random weights: a recipe's data, weights, evaluations
    # and epoch count (which reads the data's size) need not exist on the benchmark machine.
    c.data.name, c.data.path, c.data.image_root = "synthetic", "", ""
    c.init, c.num_epochs, c.evals = "", 0.0, ml_collections.ConfigDict()
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
    if pack_texts is not None:
        c.data.pack_texts = bool(pack_texts)
    if pack_group:
        c.data.pack_group = int(pack_group)
    elif c.data.get("pack_texts"):
        # Groups must tile the micro-batch: the largest of the default size that does.
        micro = c.batch_size // int(c.optim.get("grad_accum", 1))
        c.data.pack_group = math.gcd(int(c.data.pack_group), micro)
    model_overrides = (
        ("dtype", dtype),
        ("remat", remat),
        ("scan_layers", scan_layers),
        ("attention", attention),
    )
    for field, value in model_overrides:
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


class Setup(train_setup.TrainSetup):
    """The trainer's setup for one config (train_setup.TrainSetup: model, optimiser on the config's
    own schedules, sharded state, jitted step), plus a batch.

    The batch: `batch_file` (bench/batches.py's layout) if given, else random texts of
    `lengths` ("full" rows or "sharegpt4v"-like); packed when config.data.pack_texts."""

    def __init__(self, config, *, lengths: str = "full", batch_file: str | None = None):
        super().__init__(config)
        if batch_file:
            self.unpacked = batches.file_batch(config, batch_file)
            if len(self.unpacked["image"]) != int(config.batch_size):
                raise ValueError(
                    f"{batch_file} holds {len(self.unpacked['image'])} images; the benchmark's "
                    f"batch is {config.batch_size} (pass --batch to match)"
                )
        else:
            self.unpacked = batches.text_batch(config, int(config.batch_size), lengths)
        accum = int(config.optim.get("grad_accum", 1))
        local = batches.step_batch(config, self.unpacked, accum)
        self.tokens = batches.token_counts(self.unpacked, local)
        self.batch = sharding.global_batch_from_local(local, self.mesh)


def unrolled(config):
    c = config.copy_and_resolve_references()
    c.model.scan_layers = False
    return c


def step_flops(config, setup) -> tuple[dict, str]:
    """FLOPs of the compiled step; from an unrolled twin when layers are scanned."""
    if not config.model.scan_layers:
        return None, "compiled step"
    twin = Setup(unrolled(config))
    if setup is not None:  # the twin counts the step's own batch (its lengths, its packing)
        twin.batch = setup.batch
    with jax.set_mesh(twin.mesh):
        compiled = twin.jitted.lower(twin.abstract_state(), twin.batch).compile()
    return cost(compiled), "compiled unrolled twin of the step (scan bodies count once)"


def bench_step(
    config,
    steps: int,
    warmup: int,
    peak: tuple[float, str] | None = None,
    *,
    lengths: str = "full",
    batch_file: str | None = None,
):
    s = Setup(config, lengths=lengths, batch_file=batch_file)
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
        "text_tokens": s.tokens,
    }
    return result, s, state
