"""The bench command: python -m beta_clip_jax.bench [flags] (usage in the package docstring)."""

from __future__ import annotations

import json

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from beta_clip_jax.bench.report import format_table, run
from beta_clip_jax.bench.step_timing import bench_config


def _define_flags() -> None:
    """Flags are defined only when run as a command, so importing the package defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file (default: base_config).")
    config_flags.DEFINE_config_dict(
        "mesh", ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "num_devices": 0})
    )
    flags.DEFINE_string("variant", None, "Model variant (default B/16).")
    flags.DEFINE_integer("batch", None, "Global batch (default 4).")
    flags.DEFINE_integer("texts_per_image", None, "K = 1 caption + sentences + phrases (36).")
    flags.DEFINE_integer("text_length", None, "Caption/sentence tokens (248).")
    flags.DEFINE_integer("phrase_length", None, "Phrase tokens (30).")
    flags.DEFINE_string(
        "batch_file", None, "Time the step on this batch (.npz: image [B,H,W,3], texts [B,K,L])."
    )
    flags.DEFINE_enum(
        "lengths", "full", ["full", "sharegpt4v"], "Random texts: full rows or ShareGPT4V-like."
    )
    flags.DEFINE_bool("pack_texts", None, "Pack the texts (default: the config's).")
    flags.DEFINE_integer("pack_group", None, "Images per packing group (default: the config's).")
    flags.DEFINE_bool("compare_packing", False, "Also time the step packed the other way.")
    flags.DEFINE_integer("group_size", None, "β-CAL group (default min(batch, 64)).")
    flags.DEFINE_enum("cal_scope", None, ["group", "global"], "β-CAL negatives.")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Matmul compute dtype.")
    flags.DEFINE_enum("remat", None, ["none", "dots", "full"], "Rematerialisation.")
    flags.DEFINE_bool("scan_layers", None, "nn.scan over layers (--noscan_layers: unroll).")
    flags.DEFINE_enum(
        "attention",
        None,
        ["auto", "xla", "cudnn"],
        "Towers' attention kernel (default: the config's); cudnn needs bfloat16 and a GPU.",
    )
    flags.DEFINE_integer("steps", 5, "Timed steps (after --warmup).")
    flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.")
    flags.DEFINE_bool("breakdown", False, "Time towers / pooler / loss / optimiser.")
    flags.DEFINE_list("sweep_k", ["1", "6", "36"], "Breakdown FLOP sweep: K values.")
    flags.DEFINE_list("sweep_groups", ["16", "64", "256"], "Breakdown sweep: groups.")
    flags.DEFINE_bool("pipeline", True, "Also measure the input pipeline's images/s.")
    flags.DEFINE_integer("pipeline_batch", 16, "Pipeline batch size.")
    flags.DEFINE_integer("pipeline_batches", 4, "Timed pipeline batches.")
    flags.DEFINE_integer("pipeline_workers", 0, "grain worker processes.")
    flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s (0: table or measured).")
    flags.DEFINE_string("json", None, "Write the result JSON here.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    config = bench_config(
        f.config,
        variant=f.variant,
        batch=f.batch,
        k=f.texts_per_image,
        text_length=f.text_length,
        phrase_length=f.phrase_length,
        pack_texts=f.pack_texts,
        pack_group=f.pack_group,
        group_size=f.group_size,
        cal_scope=f.cal_scope,
        dtype=f.dtype,
        remat=f.remat,
        scan_layers=f.scan_layers,
        attention=f.attention,
        mesh=f.mesh,
    )
    pipe = None
    if f.pipeline:
        pipe = {
            "batch_size": f.pipeline_batch,
            "batches": f.pipeline_batches,
            "workers": f.pipeline_workers,
        }
    result = run(
        config,
        steps=f.steps,
        warmup=f.warmup,
        with_breakdown=f.breakdown,
        sweep_k=[int(x) for x in f.sweep_k] if f.breakdown else (),
        sweep_groups=[int(x) for x in f.sweep_groups],
        pipeline=pipe,
        peak_tflops=f.peak_tflops,
        lengths=f.lengths,
        batch_file=f.batch_file,
        compare_packing=f.compare_packing,
    )
    print(format_table(result))
    text = json.dumps(result, indent=1)
    print(text)
    if f.json:
        with open(f.json, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
