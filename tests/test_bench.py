"""bench: runs on CPU for the tiny model and reports every figure (keys present, finite, > 0)."""

import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from beta_clip_jax import bench, train_setup


def _positive(x, name):
    assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, (name, x)


def _tiny(scan_layers=False, **overrides):
    settings = dict(variant="tiny", batch=4, k=3, text_length=16, phrase_length=8)
    return bench.bench_config(
        **{**settings, **overrides},
        scan_layers=scan_layers,
        mesh={"data": -1, "fsdp": 1, "tensor": 1, "num_devices": 1},
    )


def test_tiny_bench_reports_every_figure():
    # One device: the FSDP step's independent collectives on simulated CPU devices can deadlock
    # XLA's CPU runtime on a loaded 2-core host (seen once in docs/bench.md's runs). Unrolled
    # layers: the compiled step's own FLOPs are the figure (no twin to compile).
    r = bench.run(
        _tiny(),
        steps=2,
        warmup=1,
        with_breakdown=True,
        sweep_k=[1, 3],
        sweep_groups=[2, 4],
        pipeline={"batch_size": 4, "batches": 1, "workers": 0, "hw": (40, 48)},
    )
    assert r["config"]["texts_per_image"] == 3 and not r["config"]["scan_layers"]
    assert r["config"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    for key in ("lower_s", "compile_s"):
        _positive(r["compile"][key], key)
    for key in ("median_s", "examples_per_s", "pairs_per_s"):
        _positive(r["step"][key], key)
    assert r["step"]["pairs_per_s"] == pytest.approx(3 * r["step"]["examples_per_s"])
    fl = r["flops"]
    for key in ("per_step_per_device", "per_example", "compiled_step_own", "mfu"):
        _positive(fl[key], key)
    for key in ("achieved_tflops_per_device", "peak_tflops_per_device"):
        _positive(fl[key], key)
    assert fl["per_step_per_device"] == fl["compiled_step_own"]
    assert fl["source"] == "compiled step"
    assert "measured" in fl["peak_source"]
    for key in ("argument_bytes", "temp_bytes", "peak_estimate_bytes", "rss_bytes"):
        _positive(r["memory"][key], key)
    for source in ("jpeg", "synthetic"):
        _positive(r["pipeline"][source]["images_per_sec"], source)
    parts = r["breakdown"]["parts"]
    assert set(parts) == {"towers", "pooler", "loss", "optimizer"}
    for name, part in parts.items():
        for key in ("median_s", "flops", "time_share", "flop_share"):
            _positive(part[key], f"{name}.{key}")
    assert sum(p["flop_share"] for p in parts.values()) == pytest.approx(1.0)
    sweep = r["breakdown"]["sweep"]
    assert [row["k"] for row in sweep] == [1, 3]
    assert sweep[1]["towers_gflops"] > sweep[0]["towers_gflops"]
    # Grouped β-CAL per image grows with the group; the pooler with K.
    assert sweep[1]["g4"]["loss_gflops"] > sweep[1]["g2"]["loss_gflops"]
    assert sweep[1]["pooler_gflops"] > sweep[0]["pooler_gflops"]
    table = bench.format_table(r)
    assert "MFU" in table and "pipeline images/s" in table and "towers" in table


def test_the_bench_builds_the_trainers_setup():
    """bench.Setup is train_setup.TrainSetup (what train.py builds) plus a batch: the optimiser
    runs on the config's own schedules, num_steps long with the pooler at rate 0 until
    loss.cal_start_step, not on a fixed schedule of its own."""
    from beta_clip_jax import optim

    cfg = _tiny()
    cfg.num_steps, cfg.loss.cal_start_step = 20, 5
    setup = bench.Setup(cfg)
    assert isinstance(setup, train_setup.TrainSetup) and setup.num_steps == 20
    frozen = int(cfg.model.frozen_positions)
    _, want = optim.make_optimizer(cfg.optim, 20, frozen, pooler_start_step=5)
    for step in (0, 4, 5, 12, 19):
        for group, schedule in want.items():
            assert float(setup.schedules[group](step)) == float(schedule(step)), (group, step)
    assert float(setup.schedules["pooler"](4)) == 0.0 < float(setup.schedules["pooler"](5))


def test_peak_table_and_config_overrides():
    assert bench.table_peak("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989.0
    assert bench.table_peak("NVIDIA H100 PCIe", "bfloat16")[0] == 756.0
    assert bench.table_peak("TPU v5 lite", "float32")[0] == 197.0
    assert bench.table_peak("cpu", "float32") is None
    cfg = bench.bench_config(variant="B/16", batch=8, k=6, dtype="bfloat16", remat="full")
    assert (cfg.data.max_sentences, cfg.data.max_phrases, cfg.loss.group_size) == (5, 0, 8)
    assert (cfg.model.vision_width, cfg.model.dtype, cfg.model.remat) == (768, "bfloat16", "full")
    assert bench.texts_per_image(bench.bench_config(variant="tiny", k=1)) == 1


def test_scanned_layers_count_flops_on_the_unrolled_twin():
    unrolled = _tiny()
    setup = bench.Setup(unrolled)
    with jax.set_mesh(setup.mesh):
        own = bench.cost(setup.jitted.lower(setup.abstract_state(), setup.batch).compile())
    counted, source = bench.step_flops(_tiny(scan_layers=True), None)
    assert "twin" in source
    assert counted["flops"] == pytest.approx(own["flops"], rel=1e-6)
    assert bench.step_flops(unrolled, None) == (None, "compiled step")


def test_import_defines_no_flags_and_attention_override():
    # Only `python -m beta_clip_jax.bench` defines the command's flags (other CLIs share names).
    # A fresh interpreter: other test modules may have imported CLIs that define some of them.
    names = ["config", "mesh", "variant", "batch", "steps", "attention", "breakdown", "json"]
    code = (
        "import absl.flags, beta_clip_jax.bench\n"
        f"print(sorted(set({names!r}) & set(absl.flags.FLAGS)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert bench.bench_config(variant="tiny", attention="xla").model.attention == "xla"
    assert bench.bench_config(variant="tiny").model.attention == "auto"


def test_batch_file_and_packing_comparison(tmp_path):
    """--batch_file: the given batch (texts [B, K, L], caption / sentences / phrases) becomes our
    batch with the run's per-level lengths; --compare_packing times it packed and unpacked. The
    two compute the same first-step loss, and the token counts are exact."""
    from beta_clip_jax.bench import batches

    cfg = _tiny(k=6, pack_texts=True)
    assert cfg.data.pack_group == 4  # the default 8 cut down to tile the batch
    rng = np.random.default_rng(0)
    texts = np.zeros((4, 6, 20), np.int32)
    lengths = [[9, 4, 20, 0, 5, 3], [16, 3, 3, 3, 8, 8], [5, 5, 0, 0, 0, 0], [12, 6, 6, 6, 11, 2]]
    for b, row in enumerate(lengths):
        for k, n in enumerate(row):
            if n:
                texts[b, k, :n] = rng.integers(1, 49000, n)
                texts[b, k, 0], texts[b, k, n - 1] = 49406, 49407
    path = tmp_path / "batch.npz"
    np.savez(path, image=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), texts=texts)
    unpacked = batches.file_batch(cfg, str(path))
    assert unpacked["valid"].tolist() == (texts.any(-1)).tolist()
    # K = 6: a caption and 5 sentences. The 20-token sentence is cut to 16, its EOT kept.
    assert unpacked["sentences"].shape == (4, 5, 16) and unpacked["phrases"].shape == (4, 0, 8)
    assert unpacked["sentences"][0, 1, -1] == 49407
    r = bench.run(cfg, steps=1, warmup=0, pipeline=None, batch_file=str(path), compare_packing=True)
    real = sum(min(n, 16) for row in lengths for n in row) / 4
    for key in ("packed", "unpacked"):
        assert r["packing"][key]["text_tokens"]["real_per_image"] == pytest.approx(real)
    assert r["packing"]["unpacked"]["text_tokens"]["computed_per_image"] == 6 * 16
    packed_tokens = r["packing"]["packed"]["text_tokens"]["computed_per_image"]
    assert packed_tokens < 6 * 16 and packed_tokens % 4 == 0  # whole rows of 16, 4 images
    assert r["config"]["lengths"] == f"file {path}" and r["config"]["pack_texts"]
    _positive(r["packing"]["speedup"], "speedup")
    assert r["packing"]["packed"]["loss"] == pytest.approx(
        r["packing"]["unpacked"]["loss"], rel=1e-5
    )
    assert "packing on / off" in bench.format_table(r)
    with pytest.raises(ValueError, match="6 text slots"):
        batches.file_batch(bench.bench_config(variant="tiny", batch=4, k=3), str(path))
