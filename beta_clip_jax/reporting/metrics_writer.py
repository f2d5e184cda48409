"""Metrics to metrics.jsonl and TensorBoard in the workdir, and a progress line on the console.

Only process 0 writes files (and the optional Weights & Biases run: config.wandb); every process
may log. Keys are prefixed train/, eval/<dataset>/,
perf/ and data/ (docs/CONTRACTS.md, The workdir).

A run that resumes calls `MetricsWriter.truncate_after(restored step)` first, so the lines a
crashed run wrote past its last checkpoint do not stay in metrics.jsonl beside the rerun's;
`latest_per_step` is the readers' defence for files written before that.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import uuid

import jax
from etils import epath


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


def wandb_mode(wandb_cfg) -> str:
    """'online', 'offline' or '' (no W&B run): an explicit mode, else online once a project is
    named."""
    if not wandb_cfg:
        return ""
    mode = str(wandb_cfg.get("mode") or "")
    if mode == "disabled":
        return ""
    return mode or ("online" if wandb_cfg.get("project") else "")


class MetricsWriter:
    """Appends one JSON object per write; mirrors scalars to TensorBoard and, when config.wandb
    asks for it, to a Weights & Biases run that holds the resolved config."""

    def __init__(self, workdir: str, wandb_cfg=None, run_config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._workdir = str(workdir)
        self._tb = None
        self._wandb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open_tensorboard()
            if wandb_mode(wandb_cfg):
                self._wandb = _open_wandb(wandb_cfg, self._workdir, run_config or {})

    def _open_tensorboard(self, purge_step: int | None = None) -> None:
        try:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides the earlier events at steps >= it (a crashed run's).
            self._tb = SummaryWriter(self._workdir, purge_step=purge_step)
        except ImportError:  # TensorBoard is optional; the JSON log is the record.
            logging.warning("tensorboardX not installed: no TensorBoard events")

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled or not scalars:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in sorted(scalars.items())}}
        line = json.dumps(record) + "\n"
        if "://" in str(self.path):
            # Object stores (gcsfs) turn append into overwrite: rewrite the whole file instead.
            previous = self.path.read_text() if self.path.exists() else ""
            self.path.write_text(previous + line)
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, float(value), int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def truncate_after(self, step: int) -> int:
        """Drops every metrics.jsonl line whose step is greater than `step` (and any line a
        killed run left half-written); returns how many were dropped.

        Call it with the restored step when a run resumes (-1 when it starts from scratch in a
        workdir a crashed run left lines in): a crashed run's lines past its checkpoint would
        otherwise stay beside the rerun's and the curves would jump back. A local file is
        replaced atomically (a temporary file, then a rename), so a crash here loses nothing;
        on object stores ("://") the whole file is rewritten, as `write` does.
        """
        if not self.enabled or not self.path.exists():
            return 0
        keep, dropped = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                record_step = None
            if record_step is None or record_step > step:
                dropped += 1
            else:
                keep.append(line + "\n")
        if not dropped:
            return 0
        text = "".join(keep)
        if "://" in str(self.path):
            self.path.write_text(text)
        else:
            tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, self.path)
        if self._tb is not None:  # reopen so that TensorBoard drops the same steps
            self._tb.close()
            self._open_tensorboard(purge_step=max(int(step) + 1, 0))
        logging.info(
            "metrics.jsonl: dropped %d lines past step %d (a previous run's)", dropped, step
        )
        return dropped

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


# The W&B run id of a workdir, so a resumed run continues the same W&B run.
WANDB_ID_FILE = "wandb_run_id.txt"


def _open_wandb(wandb_cfg, workdir: str, run_config: dict):
    try:
        import wandb
    except ImportError as e:
        from beta_clip_jax.config_check import ConfigError

        raise ConfigError(
            "config.wandb asks for a Weights & Biases run but wandb is not installed: "
            "pip install wandb (or set --config.wandb.mode=disabled)"
        ) from e
    id_path = epath.Path(workdir) / WANDB_ID_FILE
    run_id = id_path.read_text().strip() if id_path.exists() else uuid.uuid4().hex[:8]
    id_path.write_text(run_id + "\n")
    # W&B writes its files on a local disk; a bucket workdir keeps them in the temp directory.
    local_dir = str(wandb_cfg.get("dir") or "")
    if not local_dir:
        local_dir = tempfile.gettempdir() if "://" in workdir else workdir
    tags = [t.strip() for t in str(wandb_cfg.get("tags") or "").split(",") if t.strip()]
    return wandb.init(
        project=wandb_cfg.get("project") or "beta_clip_jax",
        entity=wandb_cfg.get("entity") or None,
        name=wandb_cfg.get("name") or os.path.basename(workdir.rstrip("/")) or None,
        group=wandb_cfg.get("group") or None,
        tags=tags or None,
        mode=wandb_mode(wandb_cfg),
        dir=local_dir,
        id=run_id,
        resume="allow",
        config=run_config,
        # Training prints its own progress; W&B must not wrap the console.
        settings=wandb.Settings(console="off"),
    )


def read_metrics(workdir: str) -> list[dict]:
    """Every line of metrics.jsonl, in order (a half-written line of a killed run is left out).
    Plots and tables want `latest_per_step` of it."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                logging.warning("%s: skipping a line that is not JSON: %.80s", path, line)
    return records


def latest_per_step(records: list[dict]) -> list[dict]:
    """One record per step, ascending, each key's value the last one written.

    A run writes its lines in step order, so a line whose step is below an earlier one starts a
    rerun (from a checkpoint, or from scratch): what was written before it at later steps came
    from a run that died past its checkpoint, and is dropped, as `truncate_after` would have.
    """
    by_step: dict[int, dict] = {}
    top = None
    for record in records:
        step = int(record["step"])
        if top is not None and step < top:
            for later in [s for s in by_step if s > step]:
                del by_step[later]
        top = step
        by_step.setdefault(step, {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def format_duration(seconds: float) -> str:
    """'HH:MM:SS', with whole days in front past 24 h ('1d 09:00:00'); '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    days, rest = divmod(int(round(max(seconds, 0.0))), 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


class Progress:
    """Step timing split into data wait and step time, with throughput and an ETA.

    Time spent outside the steps (evaluations, the first compile) is given to `exclude`, so that
    neither the throughput nor the ETA counts it."""

    def __init__(self, total_steps: int, examples_per_step: int, start_step: int):
        self.total = total_steps
        self.examples = examples_per_step
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.data_wait = 0.0
        self.excluded = 0.0
        self.start_step = start_step
        self.eta = float("nan")

    def add(self, data_wait: float) -> None:
        self.window_steps += 1
        self.data_wait += data_wait

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` of the current window out of the step timing."""
        self.excluded += seconds

    def summary(self, step: int) -> dict:
        """Closes the window: perf/ metrics since the last summary."""
        elapsed = max(time.perf_counter() - self.window_start - self.excluded, 1e-9)
        steps = max(self.window_steps, 1)
        out = {
            "perf/steps_per_sec": steps / elapsed,
            "perf/examples_per_sec": steps * self.examples / elapsed,
            "perf/examples_per_sec_per_device": steps
            * self.examples
            / elapsed
            / jax.device_count(),
            "perf/data_wait_sec": self.data_wait / steps,
            "perf/step_time_sec": (elapsed - self.data_wait) / steps,
        }
        self.eta = (self.total - step) * elapsed / steps
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.data_wait = 0.0
        self.excluded = 0.0
        return out

    def line(self, step: int, scalars: dict) -> str:
        eta_txt = format_duration(self.eta)
        mfu = scalars.get("perf/mfu")
        mfu_txt = f"MFU {mfu * 100:.1f}%  " if mfu is not None else ""
        return (
            f"step {step}/{self.total}  loss {scalars.get('train/loss', float('nan')):.4f}  "
            f"{scalars.get('perf/examples_per_sec', 0):.1f} ex/s  "
            f"step {scalars.get('perf/step_time_sec', 0) * 1e3:.0f} ms  "
            f"data {scalars.get('perf/data_wait_sec', 0) * 1e3:.0f} ms  {mfu_txt}ETA {eta_txt}"
        )
