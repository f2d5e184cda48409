"""Where the step's time and FLOPs go: towers, pooler, loss and optimiser update jitted alone
with the step's shapes, and a FLOP-only sweep over texts per image and β-CAL group size."""

from __future__ import annotations

import logging
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from beta_clip_jax import objective, sharding
from beta_clip_jax import step as step_lib
from beta_clip_jax.bench.batches import text_batch
from beta_clip_jax.bench.hardware import cost, time_calls
from beta_clip_jax.bench.step_timing import bench_config, texts_per_image, unrolled
from beta_clip_jax.data.transforms import normalize
from beta_clip_jax.methods import build_model
from beta_clip_jax.models.clip import param_shapes
from beta_clip_jax.models.variants import num_patches


def _parts(model, loss_cfg):
    """value_and_grad of each piece of the step, differentiated as the step differentiates it."""

    def towers(p, rest, batch):
        params = {**rest, **p}
        apply = lambda x, method: model.apply({"params": params}, x, method=method)
        cls, patches = apply(normalize(batch["image"]), "encode_image")
        return cls.sum() + patches.sum() + apply(step_lib.text_inputs(batch), "encode_texts").sum()

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
    params = param_shapes(model)  # shapes only: no optimiser, nothing allocated
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    for k in ks:
        logging.info("FLOP sweep: K=%d", k)
        c = bench_config(base, k=k, batch=1, group_size=1)
        batch = jax.tree.map(sds, text_batch(c, 1))
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
