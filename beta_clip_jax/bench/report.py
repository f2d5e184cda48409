"""The whole benchmark for one config (run), the input pipeline's rate, and the printed table."""

from __future__ import annotations

import logging
import math
import tempfile

from beta_clip_jax import step as step_lib
from beta_clip_jax.bench.hardware import device_peak, machine, process_memory
from beta_clip_jax.bench.parts import breakdown, flop_sweep
from beta_clip_jax.bench.step_timing import bench_step, texts_per_image


def pipeline_throughput(config, batch_size: int, batches: int, workers: int, hw=(480, 640)):
    """data/throughput.py's measurement with this config's K and image size: JPEGs + synthetic."""
    from beta_clip_jax.data import pipeline, throughput

    cfg = pipeline.default_data_config()
    fields = ("max_sentences", "max_phrases", "text_length", "phrase_length")
    for field in (*fields, "caption_length", "sentence_length"):
        cfg[field] = config.data[field]
    cfg.num_workers, cfg.max_skip_fraction = workers, 1.0
    # The step's packing, in groups that tile this pipeline batch.
    cfg.pack_texts = bool(config.data.get("pack_texts"))
    cfg.pack_group = math.gcd(int(config.data.get("pack_group") or 1), batch_size)
    size = step_lib.image_size(config)
    out = {"batch_size": batch_size, "num_workers": workers, "jpeg_hw": list(hw)}
    with tempfile.TemporaryDirectory() as tmp:
        real = cfg.copy_and_resolve_references()
        real.name = "jsonl"
        real.path = throughput.write_dataset(tmp, max(32, 2 * batch_size), tuple(hw))
        out["jpeg"] = throughput.measure(real, batch_size, batches, size)
    out["synthetic"] = throughput.measure(cfg, batch_size, batches, size)
    return out


def run(
    config,
    *,
    steps=5,
    warmup=1,
    with_breakdown=False,
    sweep_k=(),
    sweep_groups=(),
    pipeline=None,
    peak_tflops=0.0,
    lengths="full",
    batch_file=None,
    compare_packing=False,
) -> dict:
    """The whole benchmark for one config; `pipeline` = kwargs of pipeline_throughput or None.

    `lengths` / `batch_file`: the batch (bench/batches.py). `compare_packing`: also time the
    step with data.pack_texts the other way on the same batch, alternating the two."""
    result = {"machine": machine()}
    peak = device_peak(config.model.dtype, peak_tflops)  # on CPU measured before the step too
    batch_kw = {"lengths": lengths, "batch_file": batch_file}
    step_res, setup, state = bench_step(config, steps, warmup, peak, **batch_kw)
    result["config"] = {
        "variant": config.model.variant,
        "batch": int(config.batch_size),
        "texts_per_image": texts_per_image(config),
        "text_length": int(config.data.text_length),
        "phrase_length": int(config.data.phrase_length),
        "group_size": int(config.loss.group_size),
        "cal_scope": config.loss.get("cal_scope", "group"),
        "dtype": config.model.dtype,
        "attention": config.model.get("attention", "auto"),
        "remat": config.model.remat,
        "scan_layers": bool(config.model.scan_layers),
        "mesh": dict(setup.mesh.shape),
        "lengths": "file " + batch_file if batch_file else lengths,
        "pack_texts": bool(config.data.get("pack_texts")),
        "pack_group": int(config.data.get("pack_group") or 0),
    }
    result.update(step_res)
    if with_breakdown:
        result["breakdown"] = breakdown(setup, state, max(1, steps))
        result["breakdown"]["step_s"] = step_res["step"]["median_s"]
        if sweep_k:
            result["breakdown"]["sweep"] = flop_sweep(config, sweep_k, sweep_groups)
    del state
    if compare_packing:
        result["packing"] = packing_comparison(config, steps, warmup, peak, step_res, batch_kw)
    if pipeline is not None:
        logging.info("input pipeline")
        pipe = pipeline_throughput(config, **pipeline)
        pipe["step_examples_per_s"] = step_res["step"]["examples_per_s"]
        result["pipeline"] = pipe
    result["memory"].update(process_memory())
    return result


def packing_comparison(config, steps, warmup, peak, first: dict, batch_kw: dict) -> dict:
    """The step with data.pack_texts flipped, on the same batch; then the first setting once
    more, so a machine whose speed drifts shows it. Times are medians of `steps` steps."""
    other = config.copy_and_resolve_references()
    other.data.pack_texts = not config.data.get("pack_texts")
    second, _, _ = bench_step(other, steps, warmup, peak, **batch_kw)
    again, _, _ = bench_step(config, steps, warmup, peak, **batch_kw)
    runs = {
        bool(config.data.get("pack_texts")): [first, again],
        bool(other.data.pack_texts): [second],
    }
    summary = {}
    for packed, results in runs.items():
        key = "packed" if packed else "unpacked"
        summary[key] = {
            "median_s": [r["step"]["median_s"] for r in results],
            "examples_per_s": [r["step"]["examples_per_s"] for r in results],
            "flops_per_example": results[0]["flops"]["per_example"],
            "loss": results[0]["step"]["loss"],
            "text_tokens": results[0]["text_tokens"],
        }
    best = lambda key: min(summary[key]["median_s"])
    summary["speedup"] = best("unpacked") / best("packed")
    return summary


def _gb(x) -> str:
    return f"{x / 2**30:.2f} GiB"


def format_table(r: dict) -> str:
    c, st, fl, mem, m = r["config"], r["step"], r["flops"], r["memory"], r["machine"]
    config = (
        f"{c['variant']} batch {c['batch']} K {c['texts_per_image']} {c['dtype']} "
        f"attention={c.get('attention', 'auto')} remat={c['remat']} scan={c['scan_layers']} "
        f"mesh={c['mesh']} group={c['group_size']} scope={c['cal_scope']}"
    )
    compiled_mem = (
        f"peak est. {_gb(mem.get('peak_estimate_bytes', 0))}, "
        f"temp {_gb(mem.get('temp_bytes', 0))}, args {_gb(mem.get('argument_bytes', 0))}"
    )
    rows = [
        ("machine", f"{m['device_kind']} x{m['devices']}, {m['cpu']} ({m['cpu_cores']} cores)"),
        ("config", config),
        ("compile", f"{r['compile']['compile_s']:.1f} s (+ lower {r['compile']['lower_s']:.1f} s)"),
        ("step (median)", f"{st['median_s'] * 1e3:.1f} ms"),
        ("examples/s", f"{st['examples_per_s']:.3f}"),
        ("text-image pairs/s", f"{st['pairs_per_s']:.2f}"),
        ("FLOPs / example", f"{fl['per_example'] / 1e9:.1f} GFLOP ({fl['source']})"),
        ("achieved", f"{fl['achieved_tflops_per_device'] * 1e3:.1f} GFLOP/s per device"),
        ("peak", f"{fl['peak_tflops_per_device'] * 1e3:.1f} GFLOP/s ({fl['peak_source']})"),
        ("MFU", f"{100 * fl['mfu']:.1f} %"),
        ("memory (compiled)", compiled_mem),
        ("process RSS", f"{_gb(mem['rss_bytes'])} (max {_gb(mem['max_rss_bytes'])})"),
    ]
    tok = r.get("text_tokens")
    if tok:
        rows.append((
            "text tokens / image",
            f"{tok['real_per_image']:.0f} real, {tok['computed_per_image']:.0f} computed "
            f"({tok['computed_over_real']:.2f}x; {c.get('lengths', 'full')} lengths, "
            f"packing {'on' if c.get('pack_texts') else 'off'})",
        ))  # fmt: skip
    if "packing" in r:
        pk = r["packing"]
        times = lambda key: ", ".join(f"{t * 1e3:.0f}" for t in pk[key]["median_s"])
        rows.append((
            "packing on / off",
            f"{times('packed')} ms / {times('unpacked')} ms: {pk['speedup']:.2f}x faster packed",
        ))  # fmt: skip
    if "device_peak_bytes_in_use" in mem:
        rows.append(("device peak in use", _gb(mem["device_peak_bytes_in_use"])))
    if "pipeline" in r:
        jpeg, synthetic = r["pipeline"]["jpeg"], r["pipeline"]["synthetic"]
        rates = f"JPEG {jpeg['images_per_sec']}, synthetic {synthetic['images_per_sec']}"
        rows.append(("pipeline images/s", rates))
    if "breakdown" in r:
        for name, part in r["breakdown"]["parts"].items():
            shares = (
                f"{100 * part['time_share']:.1f} % time, {100 * part['flop_share']:.1f} % FLOPs"
            )
            rows.append((f"  {name}", f"{part['median_s'] * 1e3:.1f} ms ({shares})"))
        for row in r["breakdown"].get("sweep", []):
            shares = ", ".join(
                f"G={key[1:]}: pooler {100 * v['pooler_share']:.1f} % / β-CAL "
                f"{100 * v['loss_share']:.2f} %"
                for key, v in row.items()
                if key.startswith("g")
            )
            towers = f"towers {row['towers_gflops']:.1f} GF/img; {shares}"
            rows.append((f"  K={row['k']} FLOPs", towers))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
