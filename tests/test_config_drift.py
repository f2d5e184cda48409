"""A rerun of a workdir with a changed config: computational changes stop before anything
compiles naming `field: old -> new`, operational ones resume, allow_config_change resumes anyway.

The runs share one workdir stopped at step 2 (copied per test); every config keeps num_steps=6,
so the train step compiles once for the file.
"""

import json
import logging
import shutil

import pytest
from train_helpers import tiny_config

from beta_clip_jax import checkpoint, config_drift, train
from beta_clip_jax.config_check import ConfigError
from beta_clip_jax.reporting.metrics_writer import read_metrics
from beta_clip_jax.train import train_and_evaluate


class Compiled(Exception):
    """Raised instead of compiling the train step."""


@pytest.fixture(scope="module")
def stopped_at_2(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("drift") / "run"
    train_and_evaluate(tiny_config(stop_at_step=2), str(workdir))
    return workdir


@pytest.fixture
def workdir(stopped_at_2, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(stopped_at_2, copy)
    return copy


@pytest.fixture
def no_compile(monkeypatch):
    """Stops a run where it would build (and then compile) the train step."""

    def refuse(*args, **kwargs):
        raise Compiled

    monkeypatch.setattr(train.step_lib, "jit_train_step", refuse)


def _snapshot(workdir):
    return {
        p.relative_to(workdir).as_posix(): p.read_bytes()
        for p in sorted(workdir.rglob("*"))
        if p.is_file()
    }


def test_config_changes_on_nested_dicts():
    old = {
        "seed": 0,
        "loss": {"beta": 0.5, "mode": "ce"},
        "evals": {},
        "gone": {"x": 1, "y": [1, 2]},
        "data": {"crop_scale": [0.5, 1.0]},
    }
    new = {
        "seed": 0,
        "loss": {"beta": 0.3, "mode": "ce", "extra": True},
        "evals": {"coco": {"every": 5}},
        "data": {"crop_scale": [0.4, 1.0]},
    }
    changes = config_drift.config_changes(old, new)
    absent = config_drift.ABSENT
    assert changes == [
        ("data.crop_scale", [0.5, 1.0], [0.4, 1.0]),
        ("evals", {}, absent),
        ("evals.coco.every", absent, 5),
        ("gone.x", 1, absent),
        ("gone.y", [1, 2], absent),
        ("loss.beta", 0.5, 0.3),
        ("loss.extra", absent, True),
    ]
    assert [str(c) for c in changes[4:]] == [
        "gone.y: [1, 2] -> (absent)",
        "loss.beta: 0.5 -> 0.3",
        "loss.extra: (absent) -> true",
    ]
    assert config_drift.config_changes(old, old) == []


@pytest.mark.parametrize(
    "field, operational",
    [
        ("log_every", True),
        ("evals.coco.every", True),
        ("evals", True),
        ("wandb.project", True),
        ("mesh.fsdp", True),
        ("data.num_workers", True),
        ("data.prefetch", True),
        ("init", True),
        ("loss.beta", False),
        ("batch_size", False),
        ("optim.grad_accum", False),
        ("data.path", False),
        ("data.synthetic.seed", False),
        ("num_steps", False),
        ("model.dtype", False),
    ],
)
def test_operational_fields(field, operational):
    assert config_drift.is_operational(field) is operational


def test_check_resume_without_a_stored_config_warns_once(caplog):
    with caplog.at_level(logging.WARNING):
        assert config_drift.check_resume(tiny_config(), None, "checkpoint step 3 under X") == []
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "no stored config" in lines[0] and "\n" not in lines[0]


def test_changed_beta_stops_before_compiling(workdir, no_compile):
    before = _snapshot(workdir)
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(tiny_config(**{"loss.beta": 0.3, "seed": 1}), str(workdir))
    message = str(err.value)
    assert "loss.beta: 0.5 -> 0.3" in message and "seed: 0 -> 1" in message
    assert "checkpoint step 2" in message and "allow_config_change=True" in message
    assert "log_every" not in message  # unchanged fields are not listed
    # Refused before anything ran: config.json, checkpoints and metrics as they were.
    assert _snapshot(workdir) == before


def test_changed_log_every_resumes_and_finishes(workdir):
    train_and_evaluate(tiny_config(log_every=2, keep_checkpoints=1), str(workdir))
    steps = [r["step"] for r in read_metrics(str(workdir)) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 6]  # resumed at 3; steps <= 3 always log, then every 2nd
    step, stored = checkpoint.latest_stored_config(str(workdir))
    assert step == 6 and stored["log_every"] == 2 and stored["keep_checkpoints"] == 1
    assert json.loads((workdir / "config.json").read_text())["log_every"] == 2


def test_allow_config_change_resumes_with_the_new_beta(workdir, no_compile, caplog):
    config = tiny_config(allow_config_change=True, **{"loss.beta": 0.3})
    with caplog.at_level(logging.INFO), pytest.raises(Compiled):
        train_and_evaluate(config, str(workdir))
    messages = [r.getMessage() for r in caplog.records]
    warned = [m for m in messages if "allow_config_change=True" in m]
    assert len(warned) == 1 and "loss.beta: 0.5 -> 0.3" in warned[0]
    assert any(m.startswith("resumed from") and m.endswith("step 2") for m in messages)
    assert json.loads((workdir / "config.json").read_text())["loss"]["beta"] == 0.3


def test_checkpoint_without_stored_config_resumes_with_a_warning(workdir, caplog):
    """A checkpoint from before configs were stored: its meta has no "config"."""
    meta_file = workdir / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    with caplog.at_level(logging.WARNING):
        train._check_config_drift(tiny_config(**{"loss.beta": 0.3}), str(workdir))
    assert any("no stored config" in r.getMessage() for r in caplog.records)


def test_fields_of_another_version_are_not_drift(caplog):
    """A checkpoint's config from an earlier version lacks the fields added since (and may hold
    dropped ones): the stored run could not have set them, so they warn and resume."""
    import logging

    from train_helpers import tiny_config

    from beta_clip_jax.config_check import resolve_config

    config = resolve_config(tiny_config())
    stored = config_drift.stored_form(config)
    del stored["model"]["activation"]  # added since
    stored["loss"]["dropped_field"] = 3  # dropped since
    with caplog.at_level(logging.WARNING):
        assert config_drift.check_resume(config, stored, "checkpoint step 2") == []
    assert "model.activation" in caplog.text and "loss.dropped_field" in caplog.text
    stored["loss"]["beta"] = 0.125  # a real change is still one
    with pytest.raises(ConfigError, match="loss.beta"):
        config_drift.check_resume(config, stored, "checkpoint step 2")
