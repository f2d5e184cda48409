"""A tiny training config on the synthetic scenes, shared by the training tests."""

from beta_clip_jax.config_defaults import base_config


def tiny_config(**overrides):
    c = base_config("tiny")
    c.data.name = "synthetic"
    c.data.max_sentences = 2
    c.data.max_phrases = 4
    c.data.text_length = 48
    c.data.phrase_length = 12
    c.batch_size = 8
    c.loss.group_size = 4
    c.num_steps = 6
    c.log_every = 1
    c.checkpoint_every = 3
    c.optim.lr = 1e-3
    c.optim.final_lr = 1e-4
    c.mesh.num_devices = 1  # the sharding tests ask for all 8 simulated devices
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def losses(records, start=1):
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r and r["step"] >= start}
