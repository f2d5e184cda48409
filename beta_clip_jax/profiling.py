"""`config.profile_steps = "START,END"`: a jax.profiler trace of those training steps.

The trace goes to workdir/plugins/profile/<run>/, where TensorBoard's profile plugin finds it
(`tensorboard --logdir=WORKDIR`, the Profile tab). Only process 0 traces: one host's view is what
one looks at, and processes of a local cluster would otherwise write the same host's file. Each
step runs under a StepTraceAnnotation, so the trace viewer and the step-time graph show step
numbers.
"""

from __future__ import annotations

import contextlib
import logging

import jax


def parse_profile_steps(value) -> tuple[int, int] | None:
    """(START, END) from "START,END" (or a pair); None when empty. START <= END, both >= 1."""
    if value in (None, "", (), []):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        start, end = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise ValueError(
            f"profile_steps={value!r}: expected START,END (two step numbers, e.g. 10,20)"
        ) from None
    if not 1 <= start <= end:
        raise ValueError(f"profile_steps={value!r}: needs 1 <= START <= END")
    return start, end


class StepProfiler:
    """Starts the trace before step START and stops it after step END has finished."""

    def __init__(self, profile_steps, workdir: str):
        self.range = parse_profile_steps(profile_steps) if jax.process_index() == 0 else None
        self.workdir = str(workdir)
        self.active = False

    def step(self, step: int):
        """A context for one step: opens the trace at START, annotates the step."""
        if self.range and step == self.range[0] and not self.active:
            jax.profiler.start_trace(self.workdir)
            self.active = True
            logging.info("profiling steps %d-%d into %s/plugins/profile", *self.range, self.workdir)
        if self.active:
            return jax.profiler.StepTraceAnnotation("train", step_num=step)
        return contextlib.nullcontext()

    def after_step(self, step: int, outputs) -> None:
        """Stops the trace once step END's outputs exist."""
        if self.active and step >= self.range[1]:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if not self.active:
            return
        if outputs is not None:
            jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.active = False
        logging.info("profile written under %s/plugins/profile", self.workdir)
