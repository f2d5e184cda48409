"""Training-test helpers: configs/*.py loaded by path, dotted overrides, the tiny config."""

import importlib.util
import pathlib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg: str | None = None):
    """configs/NAME's get_config([arg]); config files are loaded by path, not imported."""
    spec = importlib.util.spec_from_file_location(f"test_config_{name[:-3]}", CONFIGS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def apply_overrides(c, overrides: dict):
    """Sets each "a.b.c" key of `overrides` in config `c`; returns `c`."""
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def tiny_config(**overrides):
    """configs/tiny_test.py on one device (the sharding tests ask for all 8 simulated devices)."""
    c = load_config("tiny_test.py")
    c.mesh.num_devices = 1
    return apply_overrides(c, overrides)


def losses(records, start=1):
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r and r["step"] >= start}
