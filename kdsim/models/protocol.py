"""The model protocol: any architecture as a pair of pure functions (SPEC §9).

A model is ``Model(init, apply)``: ``init(key) -> params`` (any pytree of float arrays)
and ``apply(params, x) -> outputs`` for ONE input batch ``x`` of shape
``(m, *input_shape)``, giving ``(m, k)`` predictions or ``(m, K)`` logits. The engine
never calls ``init`` to draw particles: it uses it for the parameter structure and, for
user modules, to measure each leaf's scale. Particles are drawn from the per-leaf laws

.. math:: w_{leaf} \\sim N(0, (s_{init} s_{leaf})^2), \\qquad
          \\text{prior } N(0, (s_0 s_{leaf})^2),

so the Langevin energy is ``gamma Lhat(w) + sum_leaf ||w_leaf||^2 / (2 s0^2 s_leaf^2)``.

Adapters: :func:`from_linen` (``module.apply({"params": p}, x)``), :func:`from_nnx`
(``nnx.split`` into graphdef + state; the state's parameters are the particle, as a
plain nested dict). :func:`prepare` checks a model against a task (output shape, input
shape, float leaves) and returns a :class:`Prepared` model for the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ConfigError

Params = Any

UNIT = "unit"                 # ``Model.scales`` of the built-in NTK modules
MEASURE_DRAWS = 4             # init draws per user model to measure leaf scales


class ModelError(ConfigError):
    """A model does not fit the task (the message names the model and the shapes)."""


class Model(NamedTuple):
    """A model as two pure functions (vmap over particles outside).

    Attributes:
      init: ``init(key) -> params``, any pytree of float arrays.
      apply: ``apply(params, x) -> (m, out)`` for inputs ``(m, *input_shape)``.
      scales: per-leaf ``s_leaf``: a pytree like ``params`` (numbers), ``"unit"``, or
        None (measured from ``init``: the root mean square of each leaf over a few draws;
        a leaf that ``init`` sets to a constant gets ``bias_scale``).
      name: what notes and the result's config call this model.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    scales: Any = None
    name: str = ""


@dataclass(frozen=True)
class _LinenInit:
    module: Any
    input_shape: tuple
    dtype: str

    def __call__(self, key):
        variables = self.module.init(key, jnp.zeros((1,) + self.input_shape, self.dtype))
        extra = sorted(set(variables) - {"params"})
        if extra:
            raise ModelError(f"{type(self.module).__name__} has variable collections {extra} "
                             "besides 'params'; kdsim trains stateless modules only "
                             "(e.g. LayerNorm instead of BatchNorm)")
        return dict(variables["params"])


@dataclass(frozen=True)
class _LinenApply:
    module: Any

    def __call__(self, params, x):
        return self.module.apply({"params": params}, x)


def from_linen(module, input_shape: tuple, dtype="float32", scales=None) -> Model:
    """A flax ``linen`` module as a :class:`Model` (hashable: the same module gives the
    same functions, so repeated runs reuse compiled programs)."""
    return Model(_LinenInit(module, tuple(input_shape), str(jnp.dtype(dtype))),
                 _LinenApply(module), scales, type(module).__name__)


class _NnxParts:
    """graphdef, abstract parameter state and the other state of an nnx module."""

    def __init__(self, module):
        from flax import nnx
        self.graphdef, params, self.rest = nnx.split(module, nnx.Param, ...)
        self.params = params
        self.pure = nnx.to_pure_dict(params)


class _NnxInit:
    def __init__(self, parts: _NnxParts):
        self.parts = parts

    def __call__(self, key):
        del key          # an nnx module is already initialised: one draw, its own
        return self.parts.pure


class _NnxApply:
    def __init__(self, parts: _NnxParts):
        self.parts = parts

    def __call__(self, params, x):
        from flax import nnx
        state = jax.tree_util.tree_map(lambda a: a, self.parts.params)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.parts.graphdef, state, self.parts.rest)(x)


_NNX_CACHE: dict[int, tuple[Any, Model]] = {}


def from_nnx(module, scales=None) -> Model:
    """A flax ``nnx`` module as a :class:`Model`: its ``nnx.Param`` state (as a plain
    nested dict) is the particle; other state is held fixed. The same module object gives
    the same functions (its compiled programs are reused)."""
    hit = _NNX_CACHE.get(id(module))
    if hit is not None and hit[0] is module and hit[1].scales is scales:
        return hit[1]
    parts = _NnxParts(module)
    model = Model(_NnxInit(parts), _NnxApply(parts), scales, type(module).__name__)
    _NNX_CACHE[id(module)] = (module, model)
    return model


def as_model(obj, input_shape: tuple, dtype="float32") -> Model:
    """A :class:`Model`, a linen module or an nnx module, as a :class:`Model`."""
    if isinstance(obj, Model):
        return obj
    import flax.linen as nn
    if isinstance(obj, nn.Module):
        return from_linen(obj, input_shape, dtype)
    try:
        from flax import nnx
        if isinstance(obj, nnx.Module):
            return from_nnx(obj)
    except ImportError:  # pragma: no cover - nnx ships with flax >= 0.8
        pass
    if isinstance(obj, tuple) and len(obj) == 2 and all(callable(f) for f in obj):
        return Model(*obj)
    raise ModelError(f"a model must be a kdsim.Model(init, apply), a flax linen module or a "
                     f"flax nnx module, got {type(obj).__name__}")


class Structure(NamedTuple):
    """The parameter structure of one particle (hashable: static to ``jax.jit``)."""

    treedef: Any
    shapes: tuple           # one shape tuple per leaf

    def zeros(self, dtype) -> Params:
        return jax.tree_util.tree_unflatten(self.treedef, [jnp.zeros(s, dtype) for s in self.shapes])

    @property
    def num_params(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))


class Prepared(NamedTuple):
    """A model checked against a task, ready for the engine."""

    apply: Callable          # hashable: static to jax.jit
    structure: Structure
    scales: tuple            # s_leaf per leaf (floats), in the structure's leaf order
    name: str
    scale_source: str        # "unit", "measured" or "given"
    role: str = "model"      # "teacher_model" / "student_model"

    @property
    def num_params(self) -> int:
        return self.structure.num_params

    def scale_tree(self, dtype) -> Params:
        """``s_leaf`` broadcast as scalars into the parameter tree."""
        return jax.tree_util.tree_unflatten(self.structure.treedef,
                                            [jnp.asarray(s, dtype) for s in self.scales])

    def describe_scales(self) -> str:
        paths = leaf_paths(self.structure)
        who = f"{self.role} ({self.name})"
        if self.scale_source == UNIT:
            return f"{who}: unit prior and initial scale for every leaf (NTK parametrisation)"
        body = ", ".join(f"{p} {s:.3g}" for p, s in zip(paths, self.scales))
        return f"{who}: per-leaf scales s_leaf ({self.scale_source}): {body}"


def leaf_paths(structure: Structure) -> list[str]:
    tree = jax.tree_util.tree_unflatten(structure.treedef, list(range(len(structure.shapes))))
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in paths]


def _measure_scales(model: Model, treedef, bias_scale: float) -> tuple[tuple, str]:
    if isinstance(model.init, _NnxInit):
        draws = [model.init(None)]
    else:
        keys = jax.random.split(jax.random.key(20260), MEASURE_DRAWS)
        draws = [model.init(k) for k in keys]
    per_leaf = zip(*(jax.tree_util.tree_leaves(d) for d in draws))
    scales = []
    for values in per_leaf:
        v = np.stack([np.asarray(x, np.float64).ravel() for x in values])
        if v.size == 0 or np.ptp(v) == 0.0:
            scales.append(float(bias_scale))     # constant initialiser (a bias, a LayerNorm scale)
        else:
            scales.append(float(np.sqrt(np.mean(v * v))))
    return tuple(scales), "measured from the initialiser; constant leaves get bias_scale"


def prepare(obj, *, role: str, input_shape: tuple, out: int, dtype, bias_scale: float = 1.0,
            what_out: str = "outputs") -> Prepared:
    """Check a model against a task and fix its structure and per-leaf scales.

    Raises :class:`ModelError` (naming ``role``, e.g. ``"student_model"``, and the shapes)
    when ``init`` fails, a leaf is not floating point, ``apply`` fails on inputs
    ``(m, *input_shape)``, or its output is not ``(m, out)``.
    """
    with jax.enable_x64(jnp.dtype(dtype) == jnp.float64):
        return _prepare(obj, role=role, input_shape=input_shape, out=out, dtype=dtype,
                        bias_scale=bias_scale, what_out=what_out)


def _prepare(obj, *, role: str, input_shape: tuple, out: int, dtype, bias_scale: float,
             what_out: str) -> Prepared:
    model = as_model(obj, input_shape, dtype)
    label = f"{role} ({model.name or type(model.apply).__name__})"
    try:
        abstract = jax.eval_shape(model.init, jax.random.key(0))
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of user code becomes one clear error
        raise ModelError(f"{label}: init(key) failed: {type(err).__name__}: {err}") from None
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    if not leaves:
        raise ModelError(f"{label}: init(key) returned no parameters")
    paths = leaf_paths(Structure(treedef, tuple(tuple(x.shape) for x in leaves)))
    for path, x in zip(paths, leaves):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ModelError(f"{label}: parameter {path} has dtype {x.dtype}; Langevin dynamics "
                             "needs floating-point parameters")
    structure = Structure(treedef, tuple(tuple(x.shape) for x in leaves))
    m = 2
    x_spec = jax.ShapeDtypeStruct((m,) + tuple(input_shape), jnp.dtype(dtype))
    try:
        y = jax.eval_shape(model.apply, structure.zeros(dtype), x_spec)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{label} fails on the task's inputs of shape (m, {_dims(input_shape)}): "
                         f"{type(err).__name__}: {err}") from None
    if not hasattr(y, "shape") or tuple(y.shape) != (m, out):
        got = tuple(y.shape) if hasattr(y, "shape") else type(y).__name__
        raise ModelError(f"{label} maps inputs (m, {_dims(input_shape)}) to {got} with m = {m}; "
                         f"the task needs (m, {out}) ({out} {what_out})")
    if model.scales is None:
        scales, source = _measure_scales(model, treedef, bias_scale)
    elif isinstance(model.scales, str):
        if model.scales != UNIT:
            raise ModelError(f"{label}: scales must be a pytree of numbers, 'unit' or None")
        scales, source = (1.0,) * len(leaves), UNIT
    else:
        given = jax.tree_util.tree_leaves(model.scales)
        if jax.tree_util.tree_structure(model.scales) != treedef:
            raise ModelError(f"{label}: scales must have the parameters' tree structure")
        scales = tuple(float(np.asarray(s)) for s in given)
        if not all(math.isfinite(s) and s > 0 for s in scales):
            raise ModelError(f"{label}: every scale must be a finite number > 0, got {scales}")
        source = "given"
    return Prepared(model.apply, structure, scales, model.name or type(model.apply).__name__,
                    source, role)


def _dims(shape: tuple) -> str:
    return ", ".join(str(s) for s in shape)


def same_structure(a: Prepared, b: Prepared) -> bool:
    """Same parameter tree structure and leaf shapes (the Girsanov condition)."""
    return a.structure == b.structure


def fingerprint(obj) -> str:
    """A stable description of a user model (for sweep point identities and result
    metadata): its class and fields, or its functions' qualified names, and for nnx
    modules the parameter shapes. Two models with the same fingerprint are treated as
    the same model."""
    if isinstance(obj, Model):
        parts = [obj.name, _qualname(obj.init), _qualname(obj.apply), repr(obj.scales)]
        if isinstance(obj.apply, _LinenApply):
            parts.append(repr(obj.apply.module))
        try:        # the parameter shapes tell apart models built by one factory
            shapes = jax.eval_shape(obj.init, jax.random.key(0))
            parts.append(repr(jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), shapes)))
        except Exception:  # noqa: BLE001 - prepare() reports a failing init
            pass
        return "Model(" + ", ".join(parts) + ")"
    import flax.linen as nn
    if isinstance(obj, nn.Module):
        return f"linen:{obj!r}"
    try:
        from flax import nnx
        if isinstance(obj, nnx.Module):
            shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape),
                                            nnx.to_pure_dict(nnx.state(obj, nnx.Param)))
            return f"nnx:{type(obj).__qualname__}:{shapes}"
    except ImportError:  # pragma: no cover
        pass
    return f"{type(obj).__qualname__}"


def _qualname(fn) -> str:
    return getattr(fn, "__module__", "") + "." + getattr(fn, "__qualname__", type(fn).__qualname__)
