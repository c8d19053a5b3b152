"""Simulation configuration: frozen, validated dataclasses (API.md, "Configuration").

A config names only what it changes; every field has a default. ``None`` in a
field means "the SPEC default", which may depend on other fields (``gamma = n /
nu^2``, the linear step size, a student field that inherits the teacher's).
:func:`resolve` turns a config into the concrete numbers a run uses, split into the
fields that fix array shapes (:class:`Static`, hashable, static to ``jax.jit``) and
the numeric ones (:class:`Numeric`, traced, so changing them never recompiles).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TASKS = ("linear_gaussian", "mlp_regression", "mlp_classification", "pool")
POOL_SOURCES = ("digits", "mnist1d", "arrays")
POOL_KINDS = ("classification", "regression")
SAMPLINGS = ("iid", "without_replacement")
ACTIVATIONS = ("tanh", "relu", "gelu", "softplus", "sigmoid", "identity")
MODEL_KINDS = ("mlp", "cnn")
SCHEDULES = ("constant", "polynomial", "cosine")
DIVERGENCES = ("exact", "stationary", "gaussian_full", "gaussian_diag", "knn", "girsanov")
CGFS = ("exact", "empirical")
DTYPES = ("float32", "float64")
PRECISIONS = ("default", "high", "highest")
# TOML configs are data written by people: anything this large is a mistake or an attack.
MAX_TOML_BYTES = 1 << 20


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field and what is allowed."""


# --------------------------------------------------------------------------------------
# Field checks: each takes a raw value, returns the normalised value or raises
# ValueError with the allowed range (the caller prefixes the field's dotted name).


@dataclass(frozen=True)
class _Int:
    lo: int | None = None
    hi: int | None = None
    optional: bool = False

    def __call__(self, v: Any) -> int | None:
        if v is None and self.optional:
            return None
        # bool is an int subclass in Python; `n = true` in a TOML file is a mistake.
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer() and math.isfinite(v):
                v = int(v)
            else:
                raise ValueError(f"must be {self.describe()}")
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise ValueError(f"must be {self.describe()}")
        return int(v)

    def describe(self) -> str:
        rng = []
        if self.lo is not None:
            rng.append(f">= {self.lo}")
        if self.hi is not None:
            rng.append(f"<= {self.hi}")
        s = "an integer" + (" " + " and ".join(rng) if rng else "")
        return s + (" or null" if self.optional else "")


@dataclass(frozen=True)
class _Float:
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    optional: bool = False

    def __call__(self, v: Any) -> float | None:
        if v is None and self.optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be {self.describe()}")
        v = float(v)
        ok = math.isfinite(v)
        ok = ok and (self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
        ok = ok and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le)
        if not ok:
            raise ValueError(f"must be {self.describe()}")
        return v

    def describe(self) -> str:
        parts = []
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        s = "a finite number" + (" " + " and ".join(parts) if parts else "")
        return s + (" or null" if self.optional else "")


@dataclass(frozen=True)
class _Choice:
    choices: tuple[str, ...]
    optional: bool = False

    def __call__(self, v: Any) -> str | None:
        if v is None and self.optional:
            return None
        if not isinstance(v, str) or v not in self.choices:
            raise ValueError(f"must be {self.describe()}")
        return v

    def describe(self) -> str:
        s = "one of " + ", ".join(repr(c) for c in self.choices)
        return s + (" or null" if self.optional else "")


@dataclass(frozen=True)
class _IntList:
    """A list of distinct integers in ``[lo, hi]`` (at least ``min_len``), or null."""

    lo: int = 0
    hi: int = 1 << 30
    min_len: int = 1

    def __call__(self, v: Any) -> tuple[int, ...] | None:
        if v is None:
            return None
        if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, (list, tuple)):
            raise ValueError(f"must be {self.describe()}")
        out = []
        for x in v:
            if isinstance(x, bool) or not isinstance(x, int) or not self.lo <= x <= self.hi:
                raise ValueError(f"must be {self.describe()}")
            out.append(int(x))
        if len(out) < self.min_len or len(set(out)) != len(out):
            raise ValueError(f"must be {self.describe()}")
        return tuple(out)

    def describe(self) -> str:
        return (f"a list of at least {self.min_len} distinct integers in [{self.lo}, {self.hi}] "
                "or null")


@dataclass(frozen=True)
class _Path:
    """A non-empty file path string, or null."""

    def __call__(self, v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str) or not v or "\x00" in v:
            raise ValueError(f"must be {self.describe()}")
        return v

    def describe(self) -> str:
        return "a file path (a non-empty string) or null"


@dataclass(frozen=True)
class _Bool:
    def __call__(self, v: Any) -> bool:
        if not isinstance(v, bool):
            raise ValueError("must be true or false")
        return v

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class _OptBool:
    def __call__(self, v: Any) -> bool | None:
        if v is None:
            return None
        return _Bool()(v)

    def describe(self) -> str:
        return "true, false or null"


def _f(default: Any, check: Callable[[Any], Any], *, static: bool, doc: str = "") -> Any:
    return field(default=default, metadata={"check": check, "static": static, "doc": doc})


def _sub(factory: Callable[[], Any]) -> Any:
    return field(default_factory=factory, metadata={"sub": True})


class _Validated:
    """Mixin: validate and normalise every checked field on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is None:
                continue
            try:
                normalised = check(value)
            except ValueError as err:
                raise ConfigError(f"{f.name} {err}, got {value!r}") from None
            object.__setattr__(self, f.name, normalised)


# --------------------------------------------------------------------------------------
# The config tree.


@dataclass(frozen=True)
class TaskConfig(_Validated):
    name: str = _f("linear_gaussian", _Choice(TASKS), static=True,
                    doc="the task: linear Gaussian case study (closed forms), a planted-MLP task, "
                        "or a pool of real data / user arrays")
    d: int = _f(8, _Int(1, 65536), static=True, doc="input dimension")
    k: int = _f(2, _Int(1, 4096), static=True, doc="output dimension k (regression)")
    n: int = _f(64, _Int(1, 1 << 24), static=True, doc="training points n per dataset")
    noise: float = _f(0.5, _Float(gt=0.0), static=False, doc="label noise nu (regression targets y = f*(x) + nu eps)")
    input_scale: float = _f(1.0, _Float(gt=0.0), static=False,
                              doc="c: input variances Sx = diag(c j^-a), j = 1..d (linear task)")
    input_decay: float = _f(0.0, _Float(ge=-4.0, le=16.0), static=False,
                              doc="a: decay of the input variances c j^-a (linear task)")
    signal_decay: float = _f(1.0, _Float(ge=-4.0, le=16.0), static=False,
                               doc="b: singular values j^-b of the planted W* (linear task)")
    n_test: int = _f(4096, _Int(1, 1 << 24), static=True,
                      doc="fresh test points per dataset for the population risk (MLP tasks)")
    num_classes: int = _f(3, _Int(2, 4096), static=True,
                           doc="classes K (mlp_classification)")
    planted_width: int = _f(32, _Int(1, 65536), static=True,
                             doc="hidden width of the planted network f* (MLP tasks)")
    planted_scale: float = _f(2.0, _Float(ge=0.0), static=False,
                               doc="output scale of the planted network f* (MLP tasks)")
    source: str = _f("digits", _Choice(POOL_SOURCES), static=True,
                     doc="pool task: the built-in pool (digits, mnist1d) or user arrays")
    kind: str = _f("classification", _Choice(POOL_KINDS), static=True,
                   doc="pool task: int labels (classification) or float targets (regression)")
    classes: tuple[int, ...] | None = _f(None, _IntList(0, 1 << 30, 2), static=True,
                                         doc="pool task: labels to keep, relabelled 0..K-1 "
                                             "(null = all)")
    sampling: str = _f("iid", _Choice(SAMPLINGS), static=True,
                       doc="pool task: n draws with replacement (iid, the exact theory) or "
                           "without_replacement (breaks the exact i.i.d. guarantee)")
    path: str | None = _f(None, _Path(), static=True,
                          doc="pool task: an .npz file with arrays X, Y (source = arrays, CLI)")


@dataclass(frozen=True)
class ModelConfig(_Validated):
    kind: str = _f("mlp", _Choice(MODEL_KINDS), static=True,
                   doc="built-in model: NTK MLP or NTK CNN (conv layers, global average pooling, "
                       "dense read-out)")
    width: int = _f(64, _Int(1, 65536), static=True, doc="hidden units per layer (mlp)")
    depth: int = _f(1, _Int(1, 64), static=True, doc="hidden layers (mlp) or conv layers (cnn)")
    activation: str = _f("tanh", _Choice(ACTIVATIONS), static=True, doc="activation function")
    channels: int = _f(16, _Int(1, 65536), static=True, doc="filters per conv layer (cnn)")
    kernel_size: int = _f(3, _Int(1, 1024), static=True, doc="conv window width (cnn)")
    bias_scale: float = _f(1.0, _Float(gt=0.0), static=False,
                           doc="s_leaf of constant-initialised leaves of user modules (biases)")


def _student_model() -> ModelConfig:
    return ModelConfig(width=8)


@dataclass(frozen=True)
class LangevinConfig(_Validated):
    """Langevin settings of the student; every ``None`` inherits the teacher's setting."""

    gamma: float | None = _f(None, _Float(gt=0.0, optional=True), static=False,
                             doc="the student's inverse temperature gamma_S; null = the teacher's")
    prior_scale: float | None = _f(None, _Float(gt=0.0, optional=True), static=False,
                                   doc="the student's prior scale s0_S; null = the teacher's")
    init_scale: float | None = _f(None, _Float(ge=0.0, optional=True), static=False,
                                  doc="the student's initial scale s_init_S; null = the teacher's")
    step_size: float | None = _f(None, _Float(gt=0.0, optional=True), static=False,
                                 doc="the student's step size h_S; null = teacher.step_size if set, "
                                     "else the default at the student's gamma and prior")
    num_steps: int | None = _f(None, _Int(0, 10_000_000, optional=True), static=True,
                               doc="the student's Langevin steps; null = the teacher's")
    schedule: str | None = _f(None, _Choice(SCHEDULES, optional=True), static=True,
                              doc="the student's step-size schedule; null = the teacher's")
    schedule_offset: float | None = _f(None, _Float(gt=0.0, optional=True), static=False,
                                       doc="b of the student's polynomial schedule; null = the teacher's")


@dataclass(frozen=True)
class TeacherConfig(_Validated):
    gamma: float | None = _f(None, _Float(gt=0.0, optional=True), static=False,
                             doc="inverse temperature gamma of the empirical risk; null = n/nu^2 "
                                 "(classification: n), the Bayesian posterior")
    prior_scale: float = _f(1.0, _Float(gt=0.0), static=False,
                               doc="prior scale s0: prior N(0, s0^2) per parameter")
    init_scale: float = _f(1.0, _Float(ge=0.0), static=False,
                              doc="initial scale s_init: chains start from N(0, s_init^2)")
    step_size: float | None = _f(None, _Float(gt=0.0, optional=True), static=False,
                                 doc="step size h; null = 0.1 / (gamma c (1 + sqrt(d/n))^2 + 1/s0^2) "
                                     "(linear task; must stay below 2 / lambda_max(A)), 1e-3 (MLP)")
    num_steps: int = _f(2000, _Int(0, 10_000_000), static=True,
                        doc="Langevin steps of the teacher (no burn-in: the kernel is the final state's law)")
    schedule: str = _f("constant", _Choice(SCHEDULES), static=True,
                       doc="step sizes h_t: constant h; polynomial h (b / (b + t))^0.55 (SGLD); "
                           "cosine decay from h to 0 over num_steps (optax)")
    schedule_offset: float = _f(100.0, _Float(gt=0.0), static=False,
                                doc="b of the polynomial schedule h_t = h (b / (b + t))^0.55")
    model: ModelConfig = _sub(ModelConfig)


@dataclass(frozen=True)
class StudentConfig(_Validated):
    alpha: float = _f(0.0, _Float(ge=0.0, le=1.0), static=False,
                       doc="weight of the hard-label loss; 1 - alpha on distillation (1 = no KD)")
    rank: int | None = _f(None, _Int(1, 65536, optional=True), static=True,
                          doc="subspace rank r of the linear student (top-r eigenvectors of Cxx); null = full")
    teacher_noise: float = _f(0.0, _Float(ge=0.0), static=False,
                               doc="nu_T: noise on the soft labels f_T(x) + nu_T e (regression)")
    temperature: float = _f(1.0, _Float(gt=0.0), static=False,
                             doc="tau: distillation temperature (classification)")
    langevin: LangevinConfig = _sub(LangevinConfig)
    model: ModelConfig = _sub(_student_model)


@dataclass(frozen=True)
class EstimatorsConfig(_Validated):
    bound_divergence: str | None = _f(None, _Choice(DIVERGENCES, optional=True), static=True,
                                      doc="KL_D the parameter-space bounds use; null = exact on the "
                                          "linear full-rank task, else girsanov")
    cgf: str | None = _f(None, _Choice(CGFS, optional=True), static=True,
                         doc="CGF of the gap the bounds use; null = exact where a closed form exists")
    channel_noise: float | None = _f(None, _Float(gt=0.0, optional=True), static=False,
                                    doc="nu_p of the predictive channel F = f_w(x) + nu_p z; null = task.noise")
    ghost_points: int | None = _f(None, _Int(1, 1 << 24, optional=True), static=True,
                                  doc="fresh points per dataset for the function-space bounds; null = n")
    knn_k: int = _f(5, _Int(1, 1000), static=True, doc="neighbours of the k-NN KL estimator")
    ess_fraction: float = _f(0.1, _Float(gt=0.0, le=1.0), static=False,
                              doc="empirical CGF: lam_max is the largest lam keeping ESS >= this fraction of P")
    c_lam: float = _f(0.5, _Float(gt=0.0, lt=1.0), static=False,
                       doc="exact CGF: B1 uses lam_max = c_lam / kappa_max")
    b3_holdout: float = _f(0.25, _Float(gt=0.0, lt=1.0), static=True,
                            doc="fraction of teacher particles held out to judge assumptions")
    b3_quantile: float = _f(1.0, _Float(gt=0.0, le=1.0), static=True,
                            doc="quantile of the teacher's distances to its centre that sets rho")
    girsanov: bool | None = _f(None, _OptBool(), static=True,
                               doc="path-space KL bound; null = whenever it applies")
    scratch: bool = _f(True, _Bool(), static=True,
                       doc="also train the student from scratch (alpha = 1) for comparison")
    channel_draws: int = _f(4, _Int(1, 10_000), static=True,
                            doc="channel noise draws per teacher particle for the function-space CGF")
    power_iterations: int = _f(50, _Int(1, 100_000), static=True,
                                doc="power-iteration steps for the top Hessian eigenvalue (models of more "
                                    "than 64 parameters; smaller ones use the exact eigenvalues)")
    hutchinson_probes: int = _f(64, _Int(2, 100_000), static=True,
                                 doc="Rademacher probes of the Hutchinson Hessian trace")
    curvature_points: int = _f(8, _Int(0, 1 << 20), static=True,
                               doc="teacher particles (besides the centre) over which S_D is maximised")
    trajectory_bounds: bool = _f(True, _Bool(), static=True,
                                 doc="accumulate the trajectory bounds (incoherence, Bayes-stability, "
                                     "KD split) along the Langevin runs")
    trajectory_examples: int | None = _f(1, _Int(1, 1 << 24, optional=True), static=True,
                                         doc="per-example gradients per step for the trajectory bounds: "
                                             "null = all n; else that many per particle and step, "
                                             "sweeping the data from a random start (unbiased; its "
                                             "noise is in the standard error). All n costs about "
                                             "n/d times the linear step")
    supersample: bool = _f(False, _Bool(), static=True,
                           doc="CMI design (SPEC §10): num_datasets supersamples of n pairs drawn "
                               "from mu, each trained under `masks` masks drawn independently of "
                               "the data; the dataset axis becomes supersamples x masks and "
                               "res.pooled gains the f-CMI / e-CMI / ld-CMI rows")
    masks: int = _f(32, _Int(16, 1 << 16), static=True,
                    doc="M: masks per supersample (supersample runs; even: complementary "
                        "pairs), each with its own num_particles particles")
    loss_clip: float | None = _f(None, _Float(gt=0.0, optional=True), static=False,
                                 doc="B of the bounds that need a loss in [0, B] (the generic rows of "
                                     "regression runs): the squared loss clipped to [0, B], truth on "
                                     "the same clipped loss; null = those rows are NaN with the reason")


@dataclass(frozen=True)
class SimConfig(_Validated):
    """A whole simulation. Build with ``SimConfig.from_dict`` or :func:`load_config`."""

    task: TaskConfig = _sub(TaskConfig)
    teacher: TeacherConfig = _sub(TeacherConfig)
    student: StudentConfig = _sub(StudentConfig)
    estimators: EstimatorsConfig = _sub(EstimatorsConfig)
    num_datasets: int = _f(16, _Int(1, 1 << 20), static=True, doc="E: independent datasets D")
    num_particles: int = _f(256, _Int(2, 1 << 30), static=True,
                             doc="P: teacher-student pairs per dataset")
    seed: int = _f(0, _Int(0, 2**32 - 1), static=True,
                    doc="root of every random stream (data, initial states, noise)")
    dtype: str = _f("float32", _Choice(DTYPES), static=True,
                     doc="engine precision (closed forms, KLs, CGFs are always float64)")
    engine_precision: str = _f("default", _Choice(PRECISIONS), static=True,
                               doc="matmul precision of the Langevin engine (jax.default_matmul_precision; "
                                   "matters on GPUs/TPUs, where float32 matmuls default to lower precision)")
    particle_chunk: int | None = _f(None, _Int(1, 1 << 30, optional=True), static=True,
                                    doc="particles per dataset advanced at once (null = all)")
    max_diverged_fraction: float = _f(0.1, _Float(ge=0.0, le=1.0), static=True,
                                      doc="a run where a larger fraction of any population "
                                          "diverges fails (simulate raises DivergenceError)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, cls in (("task", TaskConfig), ("teacher", TeacherConfig),
                          ("student", StudentConfig), ("estimators", EstimatorsConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        self._check_consistency()

    def _check_consistency(self) -> None:
        t, s = self.task, self.student
        if s.rank is not None:
            if t.name != "linear_gaussian":
                raise ConfigError(
                    "student.rank applies to the linear_gaussian task only "
                    f"(task.name is {t.name!r}); use student.model.width for MLP students")
            if s.rank > t.d:
                raise ConfigError(f"student.rank must be <= task.d = {t.d}, got {s.rank}")
        est = self.estimators
        if est.masks % 2:
            raise ConfigError(f"estimators.masks must be an even integer >= 16 (masks come in "
                              f"complementary pairs), got {est.masks}")
        p_dim = t.k * t.d
        if est.bound_divergence == "gaussian_full" and self.num_particles < 5 * p_dim \
                and t.name == "linear_gaussian":
            raise ConfigError(
                "estimators.bound_divergence = 'gaussian_full' needs num_particles >= 5 x the "
                f"parameter dimension = {5 * p_dim}, got {self.num_particles}")
        if est.bound_divergence == "knn" and self.num_particles < est.knn_k + 2:
            raise ConfigError(
                f"estimators.bound_divergence = 'knn' needs num_particles >= estimators.knn_k + 2 "
                f"= {est.knn_k + 2}, got {self.num_particles}")
        if is_classification(t) and s.teacher_noise != 0.0:
            raise ConfigError(
                f"student.teacher_noise must be 0 for {t.name} "
                f"{'(classification) ' if t.name == 'pool' else ''}(soft labels are already "
                f"distributions), got {s.teacher_noise!r}")
        if t.name == "pool":
            if t.source != "arrays" and t.kind != "classification":
                raise ConfigError(f"task.kind must be 'classification' for the built-in pool "
                                  f"{t.source!r}, got {t.kind!r}")
            if t.classes is not None and t.kind != "classification":
                raise ConfigError("task.classes applies to classification pools only "
                                  "(task.kind = 'regression')")
            if t.path is not None and t.source != "arrays":
                raise ConfigError(f"task.path needs task.source = 'arrays', got {t.source!r}")

    # ---------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SimConfig":
        """Build a config from a (possibly partial, possibly dotted-key) mapping."""
        return _build(cls, d, "")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict; ``SimConfig.from_dict(cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """TOML text (fields set to null are omitted: absent means default)."""
        return _to_toml(self.to_dict())

    def replace(self, updates: Mapping[str, Any]) -> "SimConfig":
        """A new config with dotted-path updates, e.g. ``{"task.n": 128}``."""
        merged = _nest(self.to_dict())
        for key, value in updates.items():
            _set_dotted(merged, key, value)
        return SimConfig.from_dict(merged)

    def hash(self) -> str:
        """Stable content hash (hex sha256) of the config."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


_SECTIONS = {"task": TaskConfig, "teacher": TeacherConfig, "student": StudentConfig,
             "estimators": EstimatorsConfig}


def field_paths(cls: type = SimConfig, prefix: str = "") -> list[str]:
    """Every dotted field path of a config class (for hints, sweeps and docs)."""
    out = []
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if f.metadata.get("sub"):
            out.extend(field_paths(_sub_class(cls, f.name), path + "."))
        else:
            out.append(path)
    return out


class FieldDoc(NamedTuple):
    """One row of the configuration reference."""

    path: str       # dotted field path, e.g. "teacher.step_size"
    meaning: str    # the field's ``doc``
    default: str    # the default as written in TOML ("null" = computed, see meaning)
    allowed: str    # the field check's describe(): the allowed range
    traced: bool    # numeric (traced: changing it never recompiles) or static


def reference(config: "SimConfig | None" = None) -> list[FieldDoc]:
    """Every config field, in declaration order, with its meaning, default and range.

    Generated from the fields themselves (their ``doc``, default and check), so a new
    field appears here, in ``kdsim config`` and in ``docs/config.md`` without more work.
    Sub-tables are found from the default instance, whatever their class.
    """
    rows: list[FieldDoc] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("sub"):
                walk(value, prefix + f.name + ".")
                continue
            check = f.metadata.get("check")
            rows.append(FieldDoc(
                path=prefix + f.name, meaning=f.metadata.get("doc", ""),
                default="null" if value is None else _toml_value(value),
                allowed=check.describe() if hasattr(check, "describe") else "",
                traced=not f.metadata.get("static", True)))

    walk(config if config is not None else SimConfig(), "")
    return rows


def reference_markdown() -> str:
    """The configuration reference as a Markdown document (``docs/config.md``)."""
    esc = lambda text: text.replace("|", "\\|")
    lines = [
        "# Configuration reference",
        "",
        "Generated from the fields of `kdsim/config.py` by `kdsim config --markdown`",
        "(a test checks that this file is current). A config (a dict or a TOML file) names",
        "only the fields it changes; unknown keys and out-of-range values are errors that",
        "name the field and the allowed range. `null` as a default means the value is",
        "computed from other fields, as the meaning says. *Traced* fields are numbers",
        "passed to the compiled programs as arrays: changing them never recompiles;",
        "*static* fields fix shapes or code paths.",
        "",
        "| field | meaning | default | allowed | kind |",
        "|---|---|---|---|---|",
    ]
    for row in reference():
        lines.append(f"| `{row.path}` | {esc(row.meaning)} | `{row.default}` | {esc(row.allowed)} | "
                     f"{'traced' if row.traced else 'static'} |")
    return "\n".join(lines) + "\n"


def reference_text(width: int = 100) -> str:
    """The configuration reference as plain text, for ``kdsim config``."""
    import textwrap
    out = []
    for row in reference():
        kind = "traced" if row.traced else "static"
        out.append(f"{row.path} = {row.default}    [{row.allowed}; {kind}]")
        out.extend(textwrap.wrap(row.meaning, width=width, initial_indent="    ",
                                 subsequent_indent="    "))
    return "\n".join(out) + "\n"


def _sub_class(cls: type, name: str) -> type:
    hints = {"task": TaskConfig, "teacher": TeacherConfig, "student": StudentConfig,
             "estimators": EstimatorsConfig, "model": ModelConfig, "langevin": LangevinConfig}
    return hints[name]


def _nest(d: Mapping[str, Any]) -> dict[str, Any]:
    """Copy a mapping, expanding dotted keys ``"a.b": v`` into nested dicts."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r}")
        if isinstance(value, Mapping):
            value = _nest(value)
        _set_dotted(out, key, value)
    return out


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{p} must be a table, got {nxt!r}")
        node = nxt
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        for k2, v2 in value.items():
            _set_dotted(node[parts[-1]], k2, v2)
    else:
        node[parts[-1]] = value


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {d!r}")
    d = _nest(d)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key not in names:
            path = prefix + key
            candidates = field_paths(SimConfig)
            hint = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
            if not hint:
                hint = difflib.get_close_matches(key, [c.rsplit(".", 1)[-1] for c in candidates
                                                       if c.startswith(prefix)], n=1)
                hint = [prefix + h for h in hint]
            msg = f"unknown key {path!r}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
            raise ConfigError(msg)
        f = names[key]
        if f.metadata.get("sub"):
            kwargs[key] = _build(_sub_class(cls, key), value, prefix + key + ".")
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        msg = str(err)
        # Field-level messages start with the bare field name; give them the full path.
        first = msg.split(" ", 1)[0]
        if first in names:
            msg = prefix + msg
        raise ConfigError(msg) from None


def _to_toml(d: Mapping[str, Any], prefix: str = "") -> str:
    scalars, tables = [], []
    for key, value in d.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif value is not None:
            scalars.append(f"{key} = {_toml_value(value)}")
    out = ""
    if scalars:
        if prefix:
            out += f"[{prefix}]\n"
        out += "\n".join(scalars) + "\n\n"
    for key, value in tables:
        out += _to_toml(value, f"{prefix}.{key}" if prefix else key)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def load_config(path: str | os.PathLike[str]) -> SimConfig:
    """Read a TOML config file (size-capped; parsed as data, never executed)."""
    return SimConfig.from_dict(read_toml(path))


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {err.strerror}") from None
    if size > MAX_TOML_BYTES:
        raise ConfigError(f"config file {os.fspath(path)!r} is {size} bytes; "
                          f"the limit is {MAX_TOML_BYTES}")
    with open(path, "rb") as fh:
        data = fh.read()
    return parse_toml(data.decode("utf-8", errors="replace"), str(path))


def parse_toml(text: str, where: str = "<string>") -> dict[str, Any]:
    if len(text.encode()) > MAX_TOML_BYTES:
        raise ConfigError(f"config {where} is larger than {MAX_TOML_BYTES} bytes")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config {where} is not valid TOML: {err}") from None


# --------------------------------------------------------------------------------------
# Resolution: concrete numbers for one run.


class Static(NamedTuple):
    """Everything that fixes array shapes or code paths: static to ``jax.jit``."""

    task: str
    d: int
    k: int
    n: int
    rank: int  # r; == d for the full student (Pi = I)
    full_student: bool
    num_datasets: int
    num_particles: int
    teacher_steps: int
    student_steps: int
    dtype: str
    engine_precision: str
    particle_chunk: int   # == num_particles when not chunked
    n_test: int
    num_classes: int
    planted_width: int
    teacher_width: int
    teacher_depth: int
    teacher_activation: str
    student_width: int
    student_depth: int
    student_activation: str
    teacher_kind: str
    student_kind: str
    teacher_channels: int
    teacher_kernel_size: int
    student_channels: int
    student_kernel_size: int
    teacher_schedule: str
    student_schedule: str
    classification: bool = False   # labels are classes (mlp_classification, classification pools)
    input_shape: tuple = ()        # one model input's shape (pool tasks: set from the pool)
    pool_size: int = 0             # N (pool tasks: set from the pool)
    sampling: str = "iid"          # pool tasks: how a dataset draws from the pool
    trajectory: bool = False       # accumulate the trajectory-bound sums along the runs
    trajectory_examples: int = 0   # per-example gradients per step (0: all n)
    supersample: bool = False      # CMI design: num_datasets = supersamples x masks
    supersamples: int = 0          # S (supersample runs; 0 otherwise)
    masks: int = 1                 # M (supersample runs; 1 otherwise)


class LangevinNumeric(NamedTuple):
    gamma: float
    prior_scale: float
    init_scale: float
    step_size: float
    schedule_offset: float = 100.0


class Numeric(NamedTuple):
    """Every traced number of a run (a pytree of scalars)."""

    teacher: LangevinNumeric
    student: LangevinNumeric
    alpha: float
    teacher_noise: float
    temperature: float
    noise: float
    input_scale: float
    input_decay: float
    signal_decay: float
    planted_scale: float
    channel_noise: float


class Resolved(NamedTuple):
    static: Static
    numeric: Numeric
    bound_divergence: str
    cgf: str
    ghost_points: int
    warnings: tuple[str, ...]
    girsanov: bool              # accumulate the path-space KL bound during the student run
    girsanov_reason: str        # why it does not apply ("" if it does)
    scratch: bool


def girsanov_obstacle(cfg: "SimConfig", teacher: LangevinNumeric, student: LangevinNumeric,
                      student_steps: int) -> str:
    """Why the Girsanov bound does not apply to this config ("" if it does), as far as
    the config alone can tell; the models' parameter structures are compared once they
    are built (``kdsim.simulate``).

    It bounds KL_D only when the student lives in the teacher's parameter space and runs
    with the teacher's step-size schedule, number of steps and initial law (SPEC §5).
    """
    t, s = cfg.teacher, cfg.student
    if cfg.task.name == "linear_gaussian" and s.rank is not None and s.rank < cfg.task.d:
        return "the rank-r student does not live in the teacher's parameter space"
    if student.step_size != teacher.step_size:
        return "the student's step size differs from the teacher's"
    schedule_s = s.langevin.schedule or t.schedule
    if schedule_s != t.schedule or (t.schedule == "polynomial"
                                    and student.schedule_offset != teacher.schedule_offset):
        return "the student's step-size schedule differs from the teacher's"
    if student_steps != t.num_steps:
        return "the student's number of steps differs from the teacher's"
    if student.init_scale != teacher.init_scale:
        return "the student's initial law differs from the teacher's"
    return ""


def is_classification(task: TaskConfig) -> bool:
    """Whether a task's labels are classes (cross-entropy / 0-1) rather than targets."""
    return task.name == "mlp_classification" or (task.name == "pool"
                                                  and task.kind == "classification")


def default_gamma(task: TaskConfig) -> float:
    """SPEC default inverse temperature: the Bayesian posterior ``n / nu^2`` (classification: n)."""
    if is_classification(task):
        return float(task.n)
    return task.n / task.noise**2


def input_variances(task: TaskConfig) -> list[float]:
    """Diagonal of Sx: ``c * j^(-a)``, j = 1..d."""
    return [task.input_scale * j ** (-task.input_decay) for j in range(1, task.d + 1)]


def linear_curvature_estimate(task: TaskConfig, gamma: float, prior_scale: float) -> float:
    """Estimate of lambda_max(gamma Cxx + I/s0^2): ``gamma max(Sx) (1 + sqrt(d/n))^2 + 1/s0^2``.

    ``(1 + sqrt(d/n))^2`` is the Marchenko--Pastur edge of the sample covariance.
    """
    return gamma * max(input_variances(task)) * (1 + math.sqrt(task.d / task.n)) ** 2 \
        + 1.0 / prior_scale**2


def default_step_size(task: TaskConfig, gamma: float, prior_scale: float) -> float:
    if task.name == "linear_gaussian":
        return 0.1 / linear_curvature_estimate(task, gamma, prior_scale)
    return 1e-3


def resolve(cfg: SimConfig) -> Resolved:
    """Fill every SPEC default and split the config into static and traced parts."""
    task, t, s, est = cfg.task, cfg.teacher, cfg.student, cfg.estimators
    warnings: list[str] = []

    gamma_t = t.gamma if t.gamma is not None else default_gamma(task)
    h_t = t.step_size if t.step_size is not None else default_step_size(task, gamma_t, t.prior_scale)
    teacher = LangevinNumeric(gamma_t, t.prior_scale, t.init_scale, h_t, t.schedule_offset)

    sl = s.langevin
    gamma_s = sl.gamma if sl.gamma is not None else gamma_t
    s0_s = sl.prior_scale if sl.prior_scale is not None else t.prior_scale
    init_s = sl.init_scale if sl.init_scale is not None else t.init_scale
    if sl.step_size is not None:
        h_s = sl.step_size
    elif t.step_size is not None:
        h_s = t.step_size
    else:  # the SPEC default evaluated at the student's own gamma and prior
        h_s = default_step_size(task, gamma_s, s0_s)
    steps_s = sl.num_steps if sl.num_steps is not None else t.num_steps
    offset_s = sl.schedule_offset if sl.schedule_offset is not None else t.schedule_offset
    student = LangevinNumeric(gamma_s, s0_s, init_s, h_s, offset_s)

    # The linear task's step sizes are checked against the exact stability limit
    # 2 / lambda_max(A) of the generated data before any chain runs
    # (kdsim.simulate.check_step_sizes); the Marchenko--Pastur estimate above only sets
    # the default step size.

    full = s.rank is None or s.rank == task.d
    rank = task.d if full else int(s.rank)
    linear_full = task.name == "linear_gaussian" and full
    bound_div = est.bound_divergence or ("exact" if linear_full else "girsanov")
    cgf = est.cgf or ("exact" if task.name == "linear_gaussian" else "empirical")
    ghost = est.ghost_points if est.ghost_points is not None else task.n
    nu_p = est.channel_noise if est.channel_noise is not None else task.noise

    static = Static(
        task=task.name, d=task.d, k=task.k, n=task.n, rank=rank, full_student=full,
        # a supersample run's dataset axis is supersamples x masks (dataset e = s M + m)
        num_datasets=cfg.num_datasets * (est.masks if est.supersample else 1),
        num_particles=cfg.num_particles,
        teacher_steps=t.num_steps, student_steps=steps_s, dtype=cfg.dtype,
        engine_precision=cfg.engine_precision,
        particle_chunk=min(cfg.particle_chunk or cfg.num_particles, cfg.num_particles),
        n_test=task.n_test, num_classes=task.num_classes, planted_width=task.planted_width,
        teacher_width=t.model.width, teacher_depth=t.model.depth,
        teacher_activation=t.model.activation, student_width=s.model.width,
        student_depth=s.model.depth, student_activation=s.model.activation,
        teacher_kind=t.model.kind, student_kind=s.model.kind, teacher_channels=t.model.channels,
        teacher_kernel_size=t.model.kernel_size, student_channels=s.model.channels,
        student_kernel_size=s.model.kernel_size, teacher_schedule=t.schedule,
        student_schedule=sl.schedule or t.schedule, classification=is_classification(task),
        input_shape=(task.d,), sampling=task.sampling, trajectory=est.trajectory_bounds,
        trajectory_examples=min(est.trajectory_examples or task.n, task.n),
        supersample=est.supersample,
        supersamples=cfg.num_datasets if est.supersample else 0,
        masks=est.masks if est.supersample else 1)
    numeric = Numeric(
        teacher=teacher, student=student, alpha=s.alpha, teacher_noise=s.teacher_noise,
        temperature=s.temperature, noise=task.noise, input_scale=task.input_scale,
        input_decay=task.input_decay, signal_decay=task.signal_decay,
        planted_scale=task.planted_scale, channel_noise=nu_p)
    obstacle = girsanov_obstacle(cfg, teacher, student, steps_s)
    if est.girsanov is False:
        girsanov, reason = False, "switched off (estimators.girsanov = false)"
    else:
        girsanov, reason = obstacle == "", obstacle
    if est.bound_divergence == "girsanov" and not girsanov:
        raise ConfigError(f"estimators.bound_divergence = 'girsanov' does not apply: {reason}")
    return Resolved(static, numeric, bound_div, cgf, ghost, tuple(warnings), girsanov, reason,
                    est.scratch)
