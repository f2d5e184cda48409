"""Metrics to metrics.jsonl and TensorBoard in the workdir, and a progress line on the console.

Only process 0 writes files; every process may log. Keys are prefixed train/, eval/<dataset>/,
perf/ and data/ (docs/CONTRACTS.md, The workdir).
"""

from __future__ import annotations

import json
import logging
import math
import time

import jax
from etils import epath


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricsWriter:
    """Appends one JSON object per write; mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir))
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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """Step timing split into data wait and step time, with throughput and an ETA."""

    def __init__(self, total_steps: int, examples_per_step: int, start_step: int):
        self.total = total_steps
        self.examples = examples_per_step
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.data_wait = 0.0
        self.start_step = start_step

    def add(self, data_wait: float) -> None:
        self.window_steps += 1
        self.data_wait += data_wait

    def summary(self, step: int) -> dict:
        """Closes the window: perf/ metrics since the last summary."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
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
        return out

    def line(self, step: int, scalars: dict) -> str:
        eta = getattr(self, "eta", float("nan"))
        eta_txt = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        return (
            f"step {step}/{self.total}  loss {scalars.get('train/loss', float('nan')):.4f}  "
            f"{scalars.get('perf/examples_per_sec', 0):.1f} ex/s  "
            f"step {scalars.get('perf/step_time_sec', 0) * 1e3:.0f} ms  "
            f"data {scalars.get('perf/data_wait_sec', 0) * 1e3:.0f} ms  ETA {eta_txt}"
        )
