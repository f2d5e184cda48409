"""The training loop: `train_and_evaluate(config, workdir)`, importable and used by main.py.

Phases: check the config (before any compile) -> mesh, model, data, optimiser -> restore (workdir
checkpoint, else config.init, else random) -> compile -> steps with logging, checkpoints and evals
-> final checkpoint and evaluation.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from beta_clip_jax import checkpoint, config_drift, perf, sharding, train_setup
from beta_clip_jax import step as step_lib
from beta_clip_jax.config_check import ConfigError, resolve_config
from beta_clip_jax.data import pipeline
from beta_clip_jax.methods import complete_params
from beta_clip_jax.profiling import StepProfiler
from beta_clip_jax.reporting.metrics_writer import MetricsWriter, Progress
from beta_clip_jax.tokenizer import Tokenizer


class NonFiniteError(FloatingPointError):
    """The loss or gradient stopped being finite; the last good checkpoint is kept."""


# Exit status of a run stopped early by SIGTERM or SIGINT after saving its checkpoint: sysexits'
# EX_TEMPFAIL ("try again"), so a scheduler can tell it from a finished run (0) and a crash.
STOPPED_EXIT_STATUS = 75


class Stopped(Exception):
    """The run stopped early on SIGTERM / Ctrl-C with a checkpoint; rerunning resumes it."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(
            f"{signal_name}: stopped at step {step} with a checkpoint; "
            "rerun the same command to resume"
        )
        self.step = step


def _preemption_sync_manager():
    """JAX's preemption sync manager, which jax.distributed.initialize starts on every
    multi-process run (None on one process): it takes SIGTERM (and, on Cloud TPU, maintenance
    notices) through the coordination service."""
    from jax._src import distributed

    return getattr(distributed.global_state, "preemption_sync_manager", None)


class _Preemption:
    """Saves a checkpoint and stops on SIGTERM or a first Ctrl-C; a second Ctrl-C exits at once
    (KeyboardInterrupt).

    One process: a signal handler sets a flag that the loop reads at the next step boundary.
    Several processes: every process must save the same step, which Orbax's preemption sync
    point agrees on through JAX's coordination service: `reached_preemption_sync_point(step)`
    reads a local flag each step and talks to the other processes only once a notice arrived,
    so there is no per-step collective. JAX's own notifier takes SIGTERM there (ours is not
    installed over it) and a Ctrl-C is turned into a SIGTERM to this process.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None  # the signal's name once one arrived here
        self._previous = {}
        self.synced = jax.process_count() > 1 and _preemption_sync_manager() is not None

    def install(self):
        def handler(signum, frame):
            del frame
            name = signal.Signals(signum).name
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = name
            again = " (Ctrl-C again to exit at once, without a checkpoint)"
            logging.warning(
                "%s: saving a checkpoint at the next step, then stopping%s",
                name,
                again if signum == signal.SIGINT else "",
            )
            if self.synced:  # JAX's SIGTERM notifier tells the other processes
                os.kill(os.getpid(), signal.SIGTERM)

        for sig in self.SIGNALS:
            if self.synced and sig == signal.SIGTERM:
                continue  # JAX's notifier holds SIGTERM
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def uninstall(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def agreed(self, step: int) -> bool:
        """True at the step every process stops at (call it once per step, on every process)."""
        if not self.synced:
            return bool(self.requested)
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))


def _restore_or_init(config, setup, ckpt, data_iter):
    """(params, opt_state, step); resume precedence: own checkpoint -> config.init -> random."""
    if ckpt.latest_step() is not None:
        target = setup.abstract_state()
        # The newest checkpoint that restores; a broken one is skipped by name, and none
        # restoring is an error (a fresh start would overwrite them).
        params, opt_state, _, latest = ckpt.restore_latest(
            target.params, target.opt_state, data_iter
        )
        logging.info("resumed from %s step %d", ckpt.directory, latest)
        return params, opt_state, latest
    init_params = None
    if config.init:
        init_params = load_init_params(config, setup.params_abs, setup.model)
    state = setup.init_state(init_params)
    return state.params, state.opt_state, 0


def load_init_params(config, params_abs, model):
    """Pretrained weights named by config.init (every spec api.load takes: hf:, openai:,
    openclip:, bclip:, workdir: or a bare path), completed with the parts `model`'s method adds
    (methods.complete_params)."""
    from beta_clip_jax.convert import load_pretrained

    spec = str(config.init)
    params, _ = load_pretrained(spec, config.model)
    params = complete_params(params, model, jax.random.key(int(config.seed)))
    checkpoint.check_shapes(params, params_abs, f"init weights {spec}")
    return params


def _build_evaluators(config):
    if not config.get("evals"):
        return []
    from beta_clip_jax.evals.registry import build_evaluators

    return build_evaluators(config.evals, image_size=step_lib.image_size(config))


def run_evaluators(evaluators, model, params, tokenizer, step, writer, *, force=False, mesh=None):
    """Runs the evaluators due at this step (all when forced); {dataset: {metric: value}}."""
    from beta_clip_jax.evals import registry
    from beta_clip_jax.evals.encoder import Encoder

    if not any(force or e.should_run(step) for e in evaluators):
        return {}
    start = time.perf_counter()
    encoder = Encoder.from_params(model, params, tokenizer, mesh=mesh)
    results = registry.run_evaluators(evaluators, encoder, None if force else step)
    scalars = registry.flatten(results)
    scalars["perf/eval_time_sec"] = time.perf_counter() - start
    writer.write(step, scalars)
    logging.info("evaluation at step %d\n%s", step, registry.format_table(results))
    return results


def _setup_workdir(config, workdir):
    """Creates the workdir and writes the resolved config.json (process 0). An evaluation run
    keeps an existing config.json: it describes the training run, not the evaluation. A
    training rerun first compares its config with the newest checkpoint's (config_drift.py),
    so a refused one leaves config.json as it was."""
    if config.mode != "eval":
        _check_config_drift(config, workdir)
    if jax.process_index() == 0:
        path = epath.Path(workdir) / "config.json"
        try:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            if config.mode != "eval" or not path.exists():
                checkpoint.write_json(str(path), config.to_dict())
        except OSError as e:  # read-only, no permission, a file in the way: a usage mistake
            raise ConfigError(
                f"cannot write the workdir {workdir}: {e}; pick another --workdir"
            ) from e


def _check_config_drift(config, workdir):
    stored = checkpoint.latest_stored_config(workdir)
    if stored is not None:
        step, stored_config = stored
        where = f"checkpoint step {step} under {checkpoint.checkpoint_dir(workdir)}"
        config_drift.check_resume(config, stored_config, where)


def _no_compilation_cache_on_cpu_clusters():
    """Multi-process CPU: JAX's persistent cache keys differ per process and only process 0
    writes, so process 0 alone would load cached executables, whose gloo collectives do not
    pair with the other processes' fresh ones (gloo aborts: "Received data size doesn't match
    expected size"). Must run before the first compile; GPU and TPU share one key and keep it."""
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        if jax.config.jax_enable_compilation_cache:
            logging.info("multi-process CPU run: persistent compilation cache off")
        jax.config.update("jax_enable_compilation_cache", False)


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (or, with config.mode == 'eval', only evaluates) and returns the last metrics."""
    _no_compilation_cache_on_cpu_clusters()
    config = resolve_config(config)
    # Checks the config (before any compile), then the mesh, model and optimiser the bench
    # builds the same way.
    setup = train_setup.TrainSetup(config)
    mesh, model, tx, num_steps = setup.mesh, setup.model, setup.tx, setup.num_steps
    tokenizer = Tokenizer()
    evaluators = _build_evaluators(config)
    _setup_workdir(config, workdir)
    writer = MetricsWriter(workdir, config.get("wandb"), config.to_dict())

    if config.mode == "eval":
        return _evaluate_only(config, workdir, setup, evaluators, tokenizer, writer)

    data_iter = pipeline.build_train_iterator(
        config.data,
        batch_size_per_process=config.batch_size // jax.process_count(),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        image_size=step_lib.image_size(config),
        tokenizer=tokenizer,
        micro_batches=int(config.optim.get("grad_accum", 1)),
    )
    ckpt = checkpoint.Checkpointer(
        workdir, every=config.checkpoint_every, keep=config.keep_checkpoints
    )
    params, opt_state, start = _restore_or_init(config, setup, ckpt, data_iter)
    # Lines a dead run wrote past the restored step would be drawn twice; a fresh start keeps
    # none of them.
    writer.truncate_after(start if start > 0 else -1)
    state = step_lib.TrainState(step=np.int32(start), params=params, opt_state=opt_state)
    state = jax.device_put(state, setup.state_shardings())
    jitted = setup.jitted

    preemption = _Preemption()
    preemption.install()
    examples = int(config.batch_size)
    progress = Progress(num_steps, examples, start)
    profiler = StepProfiler(config.get("profile_steps", ""), workdir)
    last = {}
    compiled = None
    utilization = None  # what perf/mfu needs, once the step is compiled
    pending = None  # (step, metrics) of the previous step, checked one step late
    try:
        if start == 0:
            run_evaluators(evaluators, model, state.params, tokenizer, 0, writer, mesh=mesh)
        for step in range(start + 1, num_steps + 1):
            t0 = time.perf_counter()
            try:
                local = next(data_iter)
            except pipeline.DataSkipError:
                if pending is not None:  # keep what trained so far, like any other stop
                    _check_finite(*pending)
                    ckpt.save(
                        step - 1, state.params, state.opt_state, data_iter, _meta(config), True
                    )
                    logging.warning("saved step %d before stopping for bad data", step - 1)
                raise
            local[step_lib.DATA_COUNTS] = _counter_rows(data_iter, len(local["image"]))
            batch = sharding.global_batch_from_local(local, mesh)
            data_wait = time.perf_counter() - t0
            if compiled is None:
                logging.info("compiling the train step ...")
                t1 = time.perf_counter()
                with jax.set_mesh(mesh):
                    compiled = jitted.lower(state, batch).compile()
                compile_time = time.perf_counter() - t1
                logging.info("compiled in %.1fs", compile_time)
                writer.write(step, {"perf/compile_time_sec": compile_time})
                utilization = _step_utilization(config, tx, mesh, state, batch, writer, step)
                progress.window_start = time.perf_counter()
            with profiler.step(step):
                state, metrics = compiled(state, batch)
            profiler.after_step(step, (state, metrics))
            progress.add(data_wait)
            if pending is not None:
                _check_finite(*pending)
            pending = (step, metrics)
            if step % config.log_every == 0 or step == num_steps or step <= 3:
                _check_finite(*pending)
                last = _log_step(
                    step, metrics, setup.schedules, progress, writer, data_iter, utilization
                )
            stop = config.get("stop_at_step", 0) and step >= config.stop_at_step
            signalled = preemption.agreed(step)
            if signalled or stop:
                _check_finite(*pending)
                ckpt.save(step, state.params, state.opt_state, data_iter, _meta(config), True)
                logging.warning("stopping at step %d; rerun the same command to resume", step)
                if signalled:
                    raise Stopped(
                        step,
                        preemption.requested
                        or "a preemption notice (SIGTERM here or on another process)",
                    )
                return last
            if step % config.checkpoint_every == 0 or step == num_steps:
                _check_finite(*pending)
                ckpt.save(
                    step,
                    state.params,
                    state.opt_state,
                    data_iter,
                    _meta(config),
                    force=step == num_steps,
                )
            t_eval = time.perf_counter()
            run_evaluators(
                evaluators,
                model,
                state.params,
                tokenizer,
                step,
                writer,
                force=step == num_steps,
                mesh=mesh,
            )
            progress.exclude(time.perf_counter() - t_eval)  # the ETA counts training steps
        logging.info("done: %d steps", num_steps)
    finally:
        profiler.stop()
        data_iter.close()
        writer.close()
        preemption.uninstall()
        ckpt.close()  # last: it raises when a background save failed
    if config.get("write_plots") and jax.process_index() == 0:
        _report_run(workdir)
    return last


def _report_run(workdir):
    """The demo's ending: the final results table, curves.png and heatmap.png (plots.py).

    A failure here (e.g. matplotlib missing) must not look like a failed training run: the
    checkpoint and metrics are already written, and `python -m beta_clip_jax.reporting.plots`
    redoes it.
    """
    from beta_clip_jax.reporting import plots

    try:
        plots.report_run(workdir)
    except Exception as e:  # noqa: BLE001 (reporting is best effort; the run itself is done)
        logging.warning("could not write the run's plots (%s: %s)", type(e).__name__, e)


def _meta(config) -> dict:
    """What each training checkpoint stores besides the arrays: the resolved config is what a
    rerun is compared with (config_drift.py)."""
    return {
        "variant": config.model.variant,
        "loss": config.loss.name,  # the method (config.method), under its older key
        "config": config_drift.stored_form(config),
    }


def _check_finite(step, metrics):
    finite = float(jax.device_get(metrics["finite"]))
    if finite < 1:
        loss = float(jax.device_get(metrics["loss"]))
        grad = float(jax.device_get(metrics["grad_norm"]))
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} (loss={loss}, grad_norm={grad}); "
            "the update was not applied and the last good checkpoint is kept"
        )


def _counter_rows(data_iter, rows: int) -> np.ndarray:
    """int32 [rows, C]: this process's data counters (data_iter.metrics(), in its order) in row
    0, zeros below, for the step to sum over all processes' rows (step.train_step)."""
    values = np.asarray(list(data_iter.metrics().values()), np.int32)
    out = np.zeros((rows, len(values)), np.int32)
    out[0] = values
    return out


def _step_utilization(config, tx, mesh, state, batch, writer, step):
    """(FLOPs per step, devices, peak TFLOP/s per device, whether the devices share that peak)
    for perf/mfu, or None when the step cannot be counted (logged; training goes on)."""
    try:
        flops, source = perf.train_step_flops(config, tx, mesh, state, batch)
    except Exception as e:  # noqa: BLE001 (MFU is telemetry; the run must not stop for it)
        logging.warning(
            "no perf/mfu: counting the step's FLOPs failed (%s: %s)", type(e).__name__, e
        )
        return None
    # On a CPU a quick 1024^3 matmul stands in for the peak; accelerators use the table.
    peak, peak_source = perf.device_peak(
        config.model.dtype, float(config.get("peak_tflops", 0.0)), matmul_size=1024
    )
    shared = peak_source.startswith("measured") and jax.default_backend() == "cpu"
    logging.info(
        "step: %.3g TFLOP (%s); peak %.3g TFLOP/s per device (%s)",
        flops / 1e12,
        source,
        peak,
        peak_source,
    )
    writer.write(step, {"perf/flops_per_step": flops, "perf/peak_tflops_per_device": peak})
    return flops, mesh.size, peak, shared


def _log_step(step, metrics, schedules, progress, writer, data_iter, utilization=None):
    metrics = dict(jax.device_get(metrics))
    counts = metrics.pop(step_lib.DATA_COUNTS, None)
    scalars = {f"train/{k}": float(v) for k, v in metrics.items()}
    scalars.pop("train/finite", None)
    for group, schedule in schedules.items():
        scalars[f"train/lr_{group}"] = float(schedule(step - 1))
    scalars.update(progress.summary(step))
    if utilization is not None:
        flops, devices, peak, shared = utilization
        seconds = 1.0 / scalars["perf/steps_per_sec"]
        scalars.update(perf.utilization(flops, seconds, devices, peak, shared))
    # Every process's counters, summed by the step (this process's alone if it had none).
    names = tuple(data_iter.metrics())
    if counts is None:
        scalars.update(data_iter.metrics())
    else:
        scalars.update({name: int(n) for name, n in zip(names, counts, strict=True)})
    writer.write(step, scalars)
    logging.info(progress.line(step, scalars))
    return scalars


def _evaluate_only(config, workdir, setup, evaluators, tokenizer, writer):
    """--config.mode=eval: the workdir's latest checkpoint, else config.init."""
    if checkpoint.has_checkpoint(workdir):
        params, _, step = checkpoint.load_params_from_workdir(workdir, step_lib.abstract_params)
    elif config.init:
        params, step = load_init_params(config, setup.params_abs, setup.model), 0
    else:
        raise ValueError(
            f"mode=eval needs a checkpoint under {checkpoint.checkpoint_dir(workdir)} "
            "or weights in config.init (hf:PATH, openai:PATH, bclip:PATH or a workdir)"
        )
    if not evaluators:
        raise ValueError("mode=eval but config.evals is empty: nothing to evaluate")
    results = run_evaluators(evaluators, setup.model, params, tokenizer, step, writer, force=True)
    checkpoint.write_json(
        str(epath.Path(workdir) / "eval_results.json"), {"step": step, "results": results}
    )
    return results
