"""Config files load, resolve their model, and name every missing path before compiling."""

import glob
import os

import pytest
from ml_collections import config_flags

from beta_clip_jax.config_check import ConfigError, check_config, resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _load(path, arg=None):
    spec = path if arg is None else f"{path}:{arg}"
    return config_flags.config_flags._ConfigFileParser(name="config").parse(spec)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_resolves(path):
    config = resolve_config(_load(path))
    assert config.model.image_size > 0 and config.batch_size > 0


def test_b16_names_every_missing_path(tmp_path):
    config = resolve_config(_load(os.path.join(ROOT, "configs", "b16_urban.py"), "bce"))
    assert config.loss.mode == "bce" and config.model.variant == "B/16"
    assert config.loss.global_gradient == "local"  # the 4-GPU recipe's global-loss gradient
    assert config.model.context_length == 248 and config.model.vision_width == 768
    with pytest.raises(FileNotFoundError) as err:
        check_config(config, device_count=1, process_count=1)
    for field in ("config.init", "config.data.path", "config.evals.urban1k.root"):
        assert field in str(err.value)


def test_b16_passes_checks_when_files_exist(tmp_path):
    config = _load(os.path.join(ROOT, "configs", "b16_urban.py"))
    weights = tmp_path / "ViT-B-16.pt"
    weights.write_bytes(b"")
    config.init = f"openai:{weights}"
    annotations = tmp_path / "sharegpt4v.json"
    annotations.write_text("[]")
    for name in (
        "data.path",
        "data.image_root",
        "evals.urban1k.root",
        "evals.sv1k.json_path",
        "evals.sv1k.image_root",
        "evals.fgovd.root",
        "evals.fgovd.image_root",
    ):
        section, *rest = name.split(".")
        target = config[section]
        for key in rest[:-1]:
            target = target[key]
        target[rest[-1]] = str(annotations if rest[-1] in ("path", "json_path") else tmp_path)
    check_config(resolve_config(config), device_count=8, process_count=1)


def test_sizes_that_cannot_work_name_the_numbers():
    config = resolve_config(_load(os.path.join(ROOT, "configs", "b16_urban.py")))
    config.batch_size = 2040
    with pytest.raises(ConfigError, match="2040"):
        check_config(config, device_count=8, process_count=1)


def test_group_size_applies_to_group_scope_only():
    """A global β-CAL has no groups, so a batch that no group size divides is fine there; a
    misspelt scope is named before anything compiles."""
    from train_helpers import tiny_config

    config = resolve_config(tiny_config(batch_size=8, **{"loss.group_size": 3}))
    with pytest.raises(ConfigError, match="group_size 3"):
        check_config(config, device_count=8, process_count=1)
    config.loss.cal_scope = "global"
    check_config(config, device_count=8, process_count=1)
    config.loss.cal_scope = "globl"
    with pytest.raises(ConfigError, match="'globl'"):
        check_config(config, device_count=8, process_count=1)


def test_cudnn_attention_without_a_gpu_is_named():
    from train_helpers import tiny_config

    config = resolve_config(tiny_config(**{"model.attention": "cudnn", "model.dtype": "bfloat16"}))
    with pytest.raises(ConfigError, match="attention='cudnn' needs an NVIDIA GPU.*'cpu'"):
        check_config(config, device_count=1, process_count=1)


def test_variant_override_changes_every_shape():
    config = _load(os.path.join(ROOT, "configs", "b16_urban.py"))
    config.model.variant = "L/14"
    resolved = resolve_config(config)
    assert resolved.model.vision_width == 1024 and resolved.model.patch_size == 14


def test_cal_start_step_after_the_last_step_is_named():
    """β-CAL switched on at or after the last step would silently train plain CLIP."""
    from train_helpers import tiny_config

    config = resolve_config(tiny_config(num_steps=10, **{"loss.cal_start_step": 10}))
    with pytest.raises(ConfigError, match="cal_start_step 10 .*10 steps"):
        check_config(config, device_count=1, process_count=1)
    config.loss.cal_start_step = -1
    with pytest.raises(ConfigError, match="cal_start_step must be >= 0"):
        check_config(config, device_count=1, process_count=1)
    config.loss.cal_start_step = 9
    check_config(config, device_count=1, process_count=1)
    config.method = config.loss.name = "clip"  # plain CLIP never runs β-CAL: nothing to check
    config.loss.cal_start_step = 10
    check_config(config, device_count=1, process_count=1)


def test_one_gpu_recipe_is_the_official_one_gpu_batch():
    """train_CE.sh / train_BCE.sh: 1 process, --batch-size 64 --update-freq 8."""
    config = resolve_config(_load(os.path.join(ROOT, "configs", "b16_urban_1gpu.py"), "bce"))
    assert config.loss.mode == "bce" and config.model.variant == "B/16"
    assert (config.batch_size, config.optim.grad_accum) == (512, 8)
    assert config.batch_size // config.optim.grad_accum == config.loss.group_size == 64
    assert config.loss.global_gradient == "full"  # one process: every logit has its gradient
    assert (config.model.dtype, config.model.remat) == ("bfloat16", "full")
    assert all(e.every == 2400 for e in config.evals.values())


def test_bench_runs_a_recipe_without_its_files():
    """The bench makes its own batch and weights: a recipe's missing data, weights and eval
    paths, and its epoch count, must not stop it."""
    from beta_clip_jax.bench.step_timing import bench_config

    recipe = _load(os.path.join(ROOT, "configs", "b16_urban_1gpu.py"))
    with pytest.raises(FileNotFoundError):
        check_config(resolve_config(recipe), device_count=1, process_count=1)
    config = bench_config(recipe)
    check_config(config, device_count=1, process_count=1)
    assert (config.batch_size, config.optim.grad_accum, config.model.remat) == (512, 8, "full")


def test_shard_patterns_count_as_existing_paths(tmp_path):
    """data.path may be a brace pattern or a shard PREFIX: it exists when it names a file."""
    from beta_clip_jax.config_check import missing_paths
    from beta_clip_jax.config_defaults import base_config

    for i in range(2):
        (tmp_path / f"train-{i:05d}-of-00002.array_record").write_bytes(b"")
    config = base_config("tiny")
    config.data.name = "array_record"
    for path in (f"{tmp_path}/train-{{00000..00001}}-of-00002.array_record", f"{tmp_path}/train"):
        config.data.path = path
        assert missing_paths(config) == []
    config.data.path = f"{tmp_path}/other-{{00000..00001}}.tar"
    assert missing_paths(config) == [f"  config.data.path = {config.data.path}"]


def test_every_init_spec_is_checked_as_training_reads_it(tmp_path, monkeypatch):
    """config.init takes every spec api.load takes; the start-up check finds each one's file
    (a hub id in the local cache included) and names the missing ones."""
    from beta_clip_jax.config_check import missing_paths
    from beta_clip_jax.config_defaults import base_config

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ViT-B-16.pt").write_bytes(b"")
    config = base_config("tiny")
    present = [
        f"workdir:{tmp_path / 'run'}",
        str(tmp_path / "run"),
        f"openai:{tmp_path / 'ViT-B-16.pt'}",
        f"bclip:{tmp_path / 'ViT-B-16.pt'}",
        f"openclip:{tmp_path / 'ViT-B-16.pt'}@ViT-B-16",
        f"hf:{tmp_path}",
    ]
    for spec in present:
        config.init = spec
        assert missing_paths(config) == [], spec
    for spec in (f"bclip:{tmp_path / 'gone.pt'}", f"workdir:{tmp_path / 'gone'}"):
        config.init = spec
        assert missing_paths(config) == [f"  config.init = {spec}"], spec
    config.init = "hf:someone/some-clip"  # a hub id: looked up in the (empty) local cache
    (line,) = missing_paths(config)
    assert line.startswith("  config.init = hf:someone/some-clip (") and "cache" in line
