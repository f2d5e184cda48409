"""The method registry: every training method the trainer carries, by its `config.method` name.

A method is one `Method` object, exported by its module under beta_clip_jax/methods/ and
registered there with `register`. It says everything the rest of the code needs to know about
it, so the model, the objective, the optimiser, the config check, the plots and the export ask
the registry and never name a method:

- its config defaults (`model_defaults`, `loss_defaults`, `optim_defaults`: fields it adds to
  config.model, config.loss and config.optim) and `check_model` / `check_config`;
- its model (`model_class`: BetaCLIP or a subclass that adds submodules and outputs);
- its loss (`loss`: model outputs -> (loss, metrics); objective.py adds the shared metrics);
- `complete_params` (a plain pretrained tree -> the tree its model needs) and
  `inference_model` (what is left of it for inference and export);
- its optimiser groups (`head_subtrees` trained at the head learning rate, `optimizer_parts`)
  and what tower locking must know (`lock_layout`, `check_lock`).

A test or a user may register a method of their own the same way; nothing else changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from beta_clip_jax.models import variants
from beta_clip_jax.models.clip import BetaCLIP, param_shapes


def _no_errors(model_cfg) -> list[str]:
    return []


def _no_check(config) -> None:
    return None


def _keep(params: dict, model, rng) -> dict:
    return params


def _no_parts(optim_cfg) -> list:
    return []


@dataclasses.dataclass(frozen=True)
class LockLayout:
    """What optimiser tower locking must know of a method's parameters inside a tower.

    stacked_blocks: extra stacked block groups ([layers, ...] leaves), in input-to-output order,
      that sit between the plain "blocks" and "last_block".
    always_train: keys directly under the tower that train even when the tower is locked.
    """

    stacked_blocks: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    always_train: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method; see the module docstring for what each field is for."""

    name: str
    loss: Callable  # (outputs, valid, loss_cfg, step, scale) -> (loss, metrics)
    title: str  # the model card's short name
    summary: str  # the model card's one-line description
    model_class: type = BetaCLIP
    outputs: tuple[str, ...] = ()  # the model outputs its loss reads beyond BetaCLIP's
    model_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    loss_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optim_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    check_model: Callable[[Any], list[str]] = _no_errors  # resolved model config -> errors
    # Settings of its model fields that only its model has ("image_branches=3"): another
    # method's config with them is refused (resolved model config -> those settings).
    claims_model: Callable[[Any], list[str]] = _no_errors
    check_config: Callable[[Any], None] = _no_check  # the whole config; raises ValueError
    complete_params: Callable = _keep  # (params, model, rng) -> params
    # resolved model config -> the method name of the model inference keeps (the name itself:
    # nothing is dropped; "beta_clip": the plain tree, after `strip_params`).
    inference_model: Callable[[Any], str] = lambda cfg: "beta_clip"
    strip_params: tuple[str, ...] = ()  # top-level keys inference drops
    head_subtrees: frozenset[str] = frozenset()  # top-level keys at the head learning rate
    optimizer_parts: Callable = _no_parts  # optim config -> extra optax transforms
    lock_layout: LockLayout = LockLayout()
    check_lock: Callable = lambda optim_cfg, model_cfg, locked: None
    packed_texts: bool = True  # trains on packed texts (data.pack_texts)
    uses_cal: bool = False  # trains β-CAL (the pooler): loss.group_size, cal_start_step apply
    # None: export writes every format; else the reason this model has no Hugging Face form.
    export_refusal: Callable[[Any], str | None] = lambda cfg: None

    @property
    def plain_model(self) -> bool:
        """Its model is β-CLIP's, with nothing added."""
        return self.model_class is BetaCLIP


@dataclasses.dataclass(frozen=True)
class ParamFilter:
    """A training-free method: a transform of a trained model's parameters that an evaluator
    reports beside the plain scores (metrics prefixed `prefix`) when its config sets any of
    `options`. `apply(params, options)` gets the params with the leaves at `paths` on the host
    (NumPy) and returns the transformed tree."""

    name: str
    prefix: str
    options: tuple[str, ...]
    paths: tuple[tuple[str, ...], ...]
    apply: Callable[[dict, Mapping], dict]


_METHODS: dict[str, Method] = {}
_FILTERS: dict[str, ParamFilter] = {}


def register_filter(param_filter: ParamFilter) -> ParamFilter:
    _FILTERS[param_filter.name] = param_filter
    return param_filter


def param_filters() -> tuple[ParamFilter, ...]:
    return tuple(_FILTERS.values())


def register(method: Method) -> Method:
    """Adds `method` (a name taken already is replaced: a test may redefine its own)."""
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Removes a method registered by a test or a user (a built-in one stays removed until the
    process restarts)."""
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str, field: str = "config.method") -> Method:
    """The method called `name`, or a ValueError naming `field` and the known methods."""
    if name not in _METHODS:
        raise ValueError(f"unknown {field}={name!r}; the methods are {', '.join(_METHODS)}")
    return _METHODS[name]


def all_methods() -> tuple[Method, ...]:
    return tuple(_METHODS.values())


def model_defaults() -> dict[str, Any]:
    """Every registered method's model fields with their defaults (each method's own)."""
    out: dict[str, Any] = {}
    for method in _METHODS.values():
        out.update(method.model_defaults)
    return out


def resolve_model_config(model_cfg) -> ml_collections.ConfigDict:
    """`config.model` -> the full model config (variants.resolve_model_config with every
    method's fields), checked: an unknown model.method, a bad value of its fields, or a setting
    only another method's model has is an error that names it."""
    cfg = variants.resolve_model_config(model_cfg, model_defaults())
    method = get_method(cfg.method or "beta_clip", "model.method")
    cfg.method = method.name
    errors = list(method.check_model(cfg))
    for other in _METHODS.values():
        if other.name == method.name:
            continue
        errors += [f"{e} needs method={other.name!r}" for e in other.claims_model(cfg)]
    if errors:
        raise ValueError("invalid model config: " + "; ".join(errors))
    return cfg


def model_config(variant: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The complete model config of a named variant (overrides of None keep its value)."""
    if variant not in variants.VARIANTS:
        raise variants.unknown_variant(variant)
    return resolve_model_config({"variant": variant, **overrides})


def method_of(model_cfg) -> Method:
    return get_method(model_cfg.get("method") or "beta_clip", "model.method")


def build_model(model_cfg) -> BetaCLIP:
    """The model of `config.model` (resolved here): its method's model class."""
    cfg = resolve_model_config(model_cfg)
    return method_of(cfg).model_class(ml_collections.FrozenConfigDict(cfg))


def complete_params(params: Mapping, model: BetaCLIP, rng: jax.Array | None = None) -> dict:
    """A plain β-CLIP tree (pretrained weights, another method's tree) -> the tree `model`'s
    method needs: training-only parts of other methods dropped, the method's own added by its
    `complete_params`, everything already of the right shape kept. Raises naming every leaf
    whose shape still differs."""
    method = method_of(model.config)
    out = jax.tree.map(np.asarray, dict(params))
    for other in _METHODS.values():
        for key in other.strip_params:
            if key not in method.strip_params:
                out.pop(key, None)
    out = method.complete_params(out, model, jax.random.key(0) if rng is None else rng)
    have, need = _flat_shapes(out), _flat_shapes(param_shapes(model))
    if have != need:
        differ = sorted(p for p in set(have) | set(need) if have.get(p) != need.get(p))
        detail = "; ".join(f"{p}: {have.get(p)} vs model {need.get(p)}" for p in differ[:8])
        raise ValueError(f"cannot complete the params for method {method.name!r}: {detail}")
    return out


def _flat_shapes(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}


def inference_params(params: Mapping, model_cfg) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, model config) of what inference and export keep of a trained model.

    A method whose parts serve training only (SmartCLIP's mask head, a SigLIP bias) drops them
    and becomes the plain β-CLIP model: encode_image and encode_text never used them, so every
    embedding is unchanged. A method whose parts are part of inference keeps its model.
    """
    cfg = resolve_model_config(model_cfg)
    method = method_of(cfg)
    out = dict(params)
    kept = method.inference_model(cfg)
    if kept != method.name:
        for key in method.strip_params:
            out.pop(key, None)
        cfg.method = kept
        for field, default in method.model_defaults.items():
            cfg[field] = default
    return out, cfg


def head_subtrees() -> frozenset[str]:
    """Top-level parameter keys trained at the head learning rate: the pooler and every
    method's own heads (a tree holds only its method's)."""
    out = {"pooler"}
    for method in _METHODS.values():
        out |= set(method.head_subtrees)
    return frozenset(out)
