"""One train setup for the trainer, the benchmark and the tests (`TrainSetup`).

It sits above the step and the config check, which it combines: a benchmark of a config times
the very step that train.py runs on it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from beta_clip_jax import optim, sharding, step
from beta_clip_jax.config_check import check_config, total_steps
from beta_clip_jax.losses import cal
from beta_clip_jax.methods import build_model


class TrainSetup:
    """What a training run builds from its (resolved) config, in one place: the checked config,
    mesh, model, the optimiser on the run's own schedules (total_steps; the pooler's starting
    at loss.cal_start_step), the abstract state, its shardings and the jitted step.

    train.py and the bench (bench/step_timing.Setup) both build it, so a benchmark of a config
    times the very step the trainer runs. The shardings trace the model's init once, on first
    use, and the step is jitted on first use (an evaluation-only run needs neither)."""

    def __init__(self, config, mesh: jax.sharding.Mesh | None = None):
        check_config(config, sharding.mesh_device_count(config.mesh), jax.process_count())
        self.config = config
        self.mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
        self.model = build_model(config.model)
        self.num_steps = total_steps(config)
        self.tx, self.schedules = optim.make_optimizer(
            config.optim,
            self.num_steps,
            int(config.model.frozen_positions),
            pooler_start_step=cal.cal_start_step(config.loss),
        )

    @functools.cached_property
    def _shardings(self):
        return step.state_shardings(self.model, self.tx, self.config, self.mesh)

    @property
    def params_abs(self):
        """Unboxed abstract params (no shardings)."""
        return self._shardings[0]

    @property
    def params_sh(self):
        return self._shardings[1]

    @property
    def opt_sh(self):
        return self._shardings[3]

    def state_shardings(self) -> step.TrainState:
        replicated = sharding.replicated(self.mesh)
        return step.TrainState(step=replicated, params=self.params_sh, opt_state=self.opt_sh)

    def abstract_state(self) -> step.TrainState:
        """The state as ShapeDtypeStructs carrying their shardings: a restore target, or what
        the step lowers on without allocating anything."""
        _, _, opt_abs, _ = self._shardings
        shapes = step.TrainState(jax.ShapeDtypeStruct((), jnp.int32), self.params_abs, opt_abs)
        sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        return jax.tree.map(sds, shapes, self.state_shardings())

    def init_state(self, init_params=None) -> step.TrainState:
        """Step 0: random params (config.seed), or `init_params`, and a fresh optimiser state,
        created sharded."""
        params, opt_state = step.init_state(
            self.model, self.tx, self.config, self.mesh, self.params_sh, self.opt_sh, init_params
        )
        first = jax.device_put(np.int32(0), sharding.replicated(self.mesh))
        return step.TrainState(step=first, params=params, opt_state=opt_state)

    @functools.cached_property
    def jitted(self):
        """The train step, jitted with the state's shardings and the state donated."""
        return step.jit_train_step(
            self.model, self.tx, self.config, self.mesh, self.params_sh, self.opt_sh
        )
