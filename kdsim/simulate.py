"""``kdsim.simulate(config) -> Result``: train the populations, estimate, evaluate.

A pure function of a validated config: the same config and seed give bit-identical
results on the same machine.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import pandas as pd

from . import closed_form, memory, populations, sharding, streams
from .config import ConfigError, Resolved, SimConfig, resolve
from .evaluation import evaluate
from .models import Prepared, builtin, prepare, same_structure
from .progress import Progress
from .progress import enabled as progress_enabled
from .result import Result, summarize
from .tasks import linear_gaussian as lg
from .tasks import mlp as mlp_task
from .timing import StageTimer
from .tasks import pool as pool_task
from .tasks import sources
from .tasks import supersample


class DivergenceError(RuntimeError):
    """Too many chains blew up; ``.run`` holds everything computed (nothing is lost)."""

    def __init__(self, message: str, run: "Run"):
        super().__init__(message)
        self.run = run


class Run(NamedTuple):
    """Everything a run produced before estimation."""

    config: SimConfig
    resolved: Resolved
    data: Any                      # tasks.linear_gaussian.LinearData | tasks.mlp.MLPData | tasks.pool.PoolData
    populations: populations.Populations
    seconds: float
    models: tuple[Prepared, Prepared] | None = None   # teacher, student (tasks with models)


def _as_config(config: SimConfig | Mapping[str, Any]) -> SimConfig:
    if isinstance(config, SimConfig):
        return config
    if isinstance(config, Mapping):
        return SimConfig.from_dict(config)
    raise ConfigError(f"config must be a SimConfig or a mapping, got {type(config).__name__}")


def run_populations(config: SimConfig | Mapping[str, Any], progress: bool | None = None, *,
                    teacher_model: Any = None, student_model: Any = None,
                    data: Any = None) -> Run:
    """Draw the datasets and train the teacher and student populations (no estimation).

    For notebooks and tests that need the particles themselves. ``progress``: show a
    progress bar (default: on a terminal, off when ``CI`` is set). ``teacher_model``,
    ``student_model``, ``data``: as for :func:`simulate`.
    """
    cfg = _as_config(config)
    res, pool = with_pool(cfg, resolve(cfg), data)
    res, models = prepare_models(cfg, res, teacher_model, student_model)
    memory.check(res, evaluate=False, params=_param_counts(models))
    return _populations(cfg, res, models, progress, pool)


def load_pool(cfg: SimConfig, data: Any = None) -> sources.Pool | None:
    """The pool of a ``pool`` task (checked: :class:`kdsim.DataError` names any problem),
    else None; ``data`` given to any other task is an error."""
    if cfg.task.name != "pool":
        if data is not None:
            raise ConfigError(f"data=(X, Y) needs task.name = 'pool' (with task.source = "
                              f"'arrays'), got task.name = {cfg.task.name!r}")
        return None
    pool = sources.load(cfg.task, data)
    pool_task.check_size(pool, cfg.task.n, cfg.task.sampling)
    return pool


def with_pool(cfg: SimConfig, res: Resolved, data: Any = None) -> tuple[Resolved, sources.Pool | None]:
    """Load a pool task's pool and put its shapes into the resolved statics: input shape,
    ``d`` = its size, ``num_classes`` = K (classification) or ``k`` = the targets' width."""
    pool = load_pool(cfg, data)
    if pool is None:
        return res, None
    d = int(np.prod(pool.input_shape))
    static = res.static._replace(input_shape=pool.input_shape, d=d, pool_size=pool.size,
                                 num_classes=pool.num_classes if pool.classification else res.static.num_classes,
                                 k=res.static.k if pool.classification else pool.out)
    return res._replace(static=static), pool


def _task_info(cfg: SimConfig, res: Resolved) -> tuple[tuple, int, str]:
    """The models' input shape, output width and what the outputs are, for a task."""
    st = res.static
    shape = st.input_shape if st.task == "pool" else (st.d,)
    if st.classification:
        return shape, st.num_classes, "class logits"
    return shape, st.k, "regression outputs"


def prepare_models(cfg: SimConfig, res: Resolved, teacher_model: Any = None,
                   student_model: Any = None) -> tuple[Resolved, tuple[Prepared, Prepared] | None]:
    """Build (built-in) or adapt (user) the teacher and student models and check them
    against the task before anything runs; decide whether Girsanov applies by comparing
    the two parameter structures and per-leaf scales.

    Raises:
      ConfigError (a :class:`kdsim.models.ModelError` is one) naming the model and the
      shapes: a model that does not fit the task, or a Girsanov request between different
      structures.
    """
    st = res.static
    if st.task == "linear_gaussian":
        if teacher_model is not None or student_model is not None:
            raise ConfigError("teacher_model / student_model need a task with models "
                              "(mlp_regression, mlp_classification); linear_gaussian has its own "
                              "linear model")
        return res, None
    input_shape, out, what = _task_info(cfg, res)
    prepared = []
    for role, given, mcfg in (("teacher_model", teacher_model, cfg.teacher.model),
                              ("student_model", student_model, cfg.student.model)):
        model = given if given is not None else builtin(mcfg, out, input_shape, st.dtype)
        prepared.append(prepare(model, role=role, input_shape=input_shape, out=out,
                                dtype=st.dtype, bias_scale=mcfg.bias_scale, what_out=what))
    teacher, student = prepared
    reason = res.girsanov_reason
    if not reason:
        if not same_structure(teacher, student):
            reason = (f"the student's parameter structure differs from the teacher's (teacher "
                      f"{teacher.name}: {_shapes(teacher)}; student {student.name}: {_shapes(student)})")
        elif teacher.scales != student.scales:
            reason = "the student's initial law differs from the teacher's (per-leaf scales differ)"
    if reason and (cfg.estimators.girsanov is True or cfg.estimators.bound_divergence == "girsanov"):
        asked = ("estimators.girsanov = true" if cfg.estimators.girsanov is True
                 else "estimators.bound_divergence = 'girsanov'")
        raise ConfigError(f"{asked} does not apply: {reason}")
    res = res._replace(girsanov=res.girsanov and not reason, girsanov_reason=reason)
    return res, (teacher, student)


def _shapes(model: Prepared) -> str:
    return f"{model.num_params} parameters in {len(model.structure.shapes)} leaves"


def _param_counts(models: tuple[Prepared, Prepared] | None) -> tuple[int, int] | None:
    return None if models is None else (models[0].num_params, models[1].num_params)


def _populations(cfg: SimConfig, res: Resolved, models, progress: bool | None,
                 pool: sources.Pool | None = None) -> Run:
    st = res.static
    chunks = -(-st.num_particles // st.particle_chunk)
    steps = (st.teacher_steps + st.student_steps * (2 if res.scratch else 1)) * chunks
    with Progress(steps, "kdsim run", enabled=progress_enabled(progress)) as bar:
        return _run(cfg, res, models, bar, pool)


def _run(cfg: SimConfig, res: Resolved, models, bar: Progress, pool: sources.Pool | None = None) -> Run:
    """Draw the data, then train the population chunk by chunk of particles.

    Every draw is keyed by global dataset and particle index, so a chunked run draws
    exactly the numbers of an unchunked one (its arithmetic agrees to float32 rounding:
    see :mod:`kdsim.sharding`); only ``num_datasets x particle_chunk`` chains are on the
    device at a time. Under multi-host JAX each process trains its share of the datasets
    (or particles) and the shares are gathered on every process.
    """
    st, nm = res.static, res.numeric
    root = streams.root_key(cfg.seed)
    t0 = time.perf_counter()
    if st.task == "linear_gaussian":
        make = lambda ds: lg.make_data(root, ds, n=st.n, d=st.d, k=st.k, rank=st.rank,
                                       full_student=st.full_student, noise=nm.noise,
                                       input_scale=nm.input_scale, input_decay=nm.input_decay,
                                       signal_decay=nm.signal_decay)
        engine = populations.run_linear
    else:
        classification = st.classification
        if st.task == "pool":
            make = lambda ds: pool_task.make_data(root, ds, pool, n=st.n, sampling=st.sampling)
        else:
            make = lambda ds: mlp_task.make_data(
                root, ds, n=st.n, d=st.d, out=st.num_classes if classification else st.k,
                n_test=st.n_test, planted_width=st.planted_width, planted_scale=nm.planted_scale,
                noise=nm.noise, classification=classification)

        def engine(root, res, data, datasets, particles, bar):
            task = populations.ModelData(data.X, data.Y, data.classification)
            return populations.run_model(root, res, task, datasets, particles, models, bar)
    if st.supersample:   # dataset e = supersample e // M under mask e % M (SPEC §10)
        make = supersample.data_maker(st, nm, root, pool)
    data = make(np.arange(st.num_datasets))
    if st.task == "linear_gaussian":     # before any chain runs: an error or notes
        res = res._replace(warnings=res.warnings + tuple(check_step_sizes(cfg, res, data)))
    share = sharding.process_share(st.num_datasets, st.num_particles)
    with jax.default_matmul_precision(st.engine_precision):
        local = _train(engine, root, res, make(share.datasets) if share.axis == 0 else data,
                       share.datasets, share.particles, bar)
    pops = populations.Populations(**populations.map_arrays(lambda x: sharding.gather(x, share), local),
                                   seconds=dict(local.seconds))
    return Run(cfg, res, data, pops, time.perf_counter() - t0, models)


# Above this fraction of the stability limit a step size gets a note: there the top
# eigen-direction's discretised stationary variance, 2 / (lambda (2 - h lambda)), is more
# than 2 / (2 - 1.8) = 10 times the Gibbs posterior's 1 / lambda, and it relaxes like
# |1 - h lambda|^t with |1 - h lambda| > 0.8: the chains are valid (the *_exact columns
# follow them) but far from the stationary laws.
STABILITY_WARN_FRACTION = 0.9


def _step_size_fields(cfg: SimConfig) -> tuple[str, str]:
    """The fields that set the teacher's and the student's step sizes (a student that
    inherits its step size names where it comes from)."""
    sl = cfg.student.langevin
    if sl.step_size is not None:
        student = "student.langevin.step_size"
    elif cfg.teacher.step_size is not None:
        student = "student.langevin.step_size (inherited from teacher.step_size)"
    else:
        student = "student.langevin.step_size (default)"
    teacher = "teacher.step_size" if cfg.teacher.step_size is not None else "teacher.step_size (default)"
    return teacher, student


def stability_limits(res: Resolved, data) -> tuple[np.ndarray, np.ndarray]:
    """``2 / lambda_max(A)`` of the teacher's and the student's drift, per dataset ``(E,)``."""
    A_T, A_S = closed_form.precision_matrices(data, res.numeric)
    return closed_form.stability_limit(A_T), closed_form.stability_limit(A_S)


def check_step_sizes(cfg: SimConfig, res: Resolved, data) -> list[str]:
    """Compare the linear task's step sizes with the exact stability limit of the data.

    ``h >= 2 / lambda_max(A)`` on any dataset (``A = gamma Cxx + I/s0^2``; the student's
    ``gamma_S Pi^T Cxx Pi + I/s0_S^2``) raises :class:`ConfigError` naming the field, the
    value and the limit: such a chain grows like ``|1 - h lambda_max|^T`` (at the limit
    itself its variance grows without bound). Above :data:`STABILITY_WARN_FRACTION` of
    the limit it returns a note.
    """
    st, nm = res.static, res.numeric
    notes = []
    limits = stability_limits(res, data)
    drifts = ("gamma Cxx + I/s0^2", "gamma_S Pi^T Cxx Pi + I/s0_S^2")
    for field, drift, p, limit, steps in zip(_step_size_fields(cfg), drifts, (nm.teacher, nm.student),
                                             limits, (st.teacher_steps, st.student_steps)):
        if steps == 0:
            continue
        e = int(np.argmin(limit))
        lim = float(limit[e])
        if p.step_size >= lim:
            raise ConfigError(
                f"{field} = {p.step_size:.4g} is beyond the stability limit 2 / lambda_max({drift}) "
                f"= {lim:.4g} (dataset {e}, the smallest limit of {len(limit)}): the "
                f"chains would grow like |1 - h lambda_max|^T; use a step size below {lim:.4g}")
        if p.step_size > STABILITY_WARN_FRACTION * lim:
            ratio = 2.0 / (2.0 - p.step_size * 2.0 / lim)
            notes.append(
                f"{field} = {p.step_size:.4g} is {p.step_size / lim:.0%} of the stability limit "
                f"2 / lambda_max = {lim:.4g} (dataset {e}): along the top eigen-direction the "
                f"chain's stationary variance is {ratio:.3g} times the Gibbs posterior's and "
                "relaxes slowly; the *_exact columns follow the discretised chain, the "
                "*_stationary ones do not")
    return notes


def _train(engine, root, res: Resolved, data, datasets: np.ndarray, particles: np.ndarray,
           bar: Progress) -> populations.Populations:
    """The given (global) datasets and particles, ``particle_chunk`` particles at a time."""
    P = len(particles)
    chunk = min(res.static.particle_chunk, P)
    # every chunk has the same shape (the last one padded with extra chains that are
    # dropped): one compiled program for every chunk
    ids = np.concatenate([particles, particles[-1] + 1 + np.arange(-P % chunk)])
    parts = [engine(root, res, data, datasets, ids[lo:lo + chunk], bar) for lo in range(0, P, chunk)]
    return parts[0] if len(parts) == 1 and chunk == P else populations.concatenate(parts, P)


def simulate(config: SimConfig | Mapping[str, Any], teacher_model: Any = None,
             student_model: Any = None, data: Any = None, progress: bool | None = None) -> Result:
    """Run one simulation and estimate every quantity of the theory.

    Args:
      config: a :class:`SimConfig` or a (partial) mapping accepted by ``SimConfig.from_dict``.
      teacher_model, student_model: a flax ``linen`` module, a flax ``nnx`` module or a
        :class:`kdsim.Model` ``(init, apply)``; given, it replaces ``teacher.model`` /
        ``student.model`` of the config (tasks with models: the MLP and pool tasks).
      data: ``(X, Y)`` numpy or JAX arrays, the pool of a ``pool`` task with
        ``task.source = "arrays"``: ``X (N, *input_shape)``, ``Y (N,)`` int labels in
        ``[0, K)`` (``task.kind = "classification"``) or ``(N, k)`` float targets.
      progress: show a progress bar over the Langevin steps (default: on a terminal,
        off when the environment variable ``CI`` is set).
    Returns:
      a :class:`Result` with ``per_dataset`` (one row per dataset), ``summary``,
      ``datasets``, ``config`` and ``notes``.
    """
    t0 = time.perf_counter()
    cfg = _as_config(config)
    res, pool = with_pool(cfg, resolve(cfg), data)
    res, models = prepare_models(cfg, res, teacher_model, student_model)
    memory.check(res, params=_param_counts(models))   # the estimators' memory too, before any work
    run = _populations(cfg, res, models, progress, pool)
    check_divergence(run)
    timer = StageTimer()
    per_dataset, pooled, notes = evaluate(run, timer)
    if run.resolved.static.task == "linear_gaussian":
        datasets = {"X": run.data.X, "Y": run.data.Y, "W_star": run.data.W_star}
    elif run.resolved.static.task == "pool":
        datasets = {"X": run.data.X.astype(np.float64), "Y": run.data.Y,
                    "index": run.data.index.astype(np.int64)}
        notes = [pool_note(run)] + notes
    else:
        datasets = {"X": run.data.X.astype(np.float64), "Y": run.data.Y,
                    "planted_A": run.data.A, "planted_B": run.data.B}
    with timer("tables"):
        summary = summarize(per_dataset, seed=run.config.seed)
        model_notes = [] if models is None else [m.describe_scales() for m in models]
        notes = list(run.resolved.warnings) + model_notes + notes + summary_notes(per_dataset)
    st = run.resolved.static
    meta = {
        "engine_seconds": run.seconds,
        "phase_seconds": dict(run.populations.seconds),
        "total_seconds": time.perf_counter() - t0,
        # seconds per stage: engine, closed_forms, estimators, bounds, tables
        "timings": {"engine": run.seconds, **timer.seconds},
        "particle_steps": st.num_datasets * st.num_particles * (st.teacher_steps + st.student_steps),
        "resolved": {"static": st._asdict(), "numeric": _numeric_dict(run.resolved),
                     "bound_divergence": run.resolved.bound_divergence,
                     "cgf": run.resolved.cgf},
    }
    if models is not None:
        user = {"teacher": teacher_model, "student": student_model}
        meta["models"] = {role: {"name": m.name, "custom": user[role] is not None,
                                 "class": type(user[role]).__name__ if user[role] is not None else None,
                                 "num_params": m.num_params, "scales": m.scale_source}
                          for role, m in zip(("teacher", "student"), models)}
    if pool is not None:
        meta["pool"] = {"source": pool.source, "size": pool.size, "input_shape": list(pool.input_shape),
                        "num_classes": pool.num_classes, "sha256": pool.digest}
    return Result(config=run.config, per_dataset=per_dataset, summary=summary,
                  datasets=datasets, notes=notes, meta=meta, pooled=pooled)


def pool_note(run: Run) -> str:
    cfg, st, pool = run.config, run.resolved.static, run.data.pool
    what = (f"{pool.num_classes} classes" if pool.classification
            else f"regression targets of width {pool.out}")
    how = ("i.i.d. with replacement (mu = uniform on the pool)" if st.sampling == "iid" else
           "without replacement: the datasets are NOT i.i.d. draws from mu")
    return (f"pool: {pool.source}, N = {pool.size} points of shape {pool.input_shape}, {what}"
            + (f" (classes {list(cfg.task.classes)} relabelled 0..{pool.num_classes - 1})"
               if cfg.task.classes else "")
            + f"; datasets of n = {st.n} draws {how}; population risks are exact pool averages")


def check_divergence(run: Run) -> None:
    """Raise :class:`DivergenceError` when more than ``max_diverged_fraction`` of the
    teachers, students or scratch students blew up: their estimates would rest on the
    survivors only, a biased remnant of the population."""
    cfg, res, pops = run.config, run.resolved, run.populations
    limit = cfg.max_diverged_fraction
    phases = (("teacher", "teacher", pops.diverged_T, pops.diverged_step_T, res.numeric.teacher),
              ("student", "student.langevin", pops.diverged_S, pops.diverged_step_S, res.numeric.student),
              ("scratch student", "student.langevin", pops.diverged_scratch, None, res.numeric.student))
    for who, field, diverged, steps, p in phases:
        frac = float(np.mean(diverged))
        if frac <= limit:
            continue
        first = f", the first at step {int(steps[diverged].min())}" if steps is not None else ""
        hint = f"reduce {field}.step_size (now {p.step_size:.3g})"
        if res.static.task == "linear_gaussian":
            stable = stability_limits(res, run.data)[0 if who == "teacher" else 1].min()
            hint += f"; the stability limit 2 / lambda_max is {stable:.3g}"
        raise DivergenceError(
            f"{int(diverged.sum())} of {diverged.size} {who} chains diverged ({frac:.0%}{first}; "
            "overflowed or left the region a healthy chain never reaches), "
            f"more than max_diverged_fraction = {limit:g}: {hint}", run)


def _numeric_dict(res: Resolved) -> dict[str, Any]:
    out = {}
    for k, v in res.numeric._asdict().items():
        out[k] = v._asdict() if hasattr(v, "_asdict") else v
    return out


def summary_notes(per_dataset: pd.DataFrame) -> list[str]:
    """Name every column that holds NaN or inf, so nothing non-finite passes silently.

    (Each such column's reason is in the notes of the stage that produced it.)
    """
    all_nan, some_nan, infinite = [], [], []
    E = len(per_dataset)
    for col in per_dataset.columns:
        v = per_dataset[col].to_numpy(dtype=np.float64, na_value=np.nan)
        n_nan, n_inf = int(np.isnan(v).sum()), int(np.isinf(v).sum())
        if n_nan == E:
            all_nan.append(col)
        elif n_nan:
            some_nan.append(f"{col} ({n_nan} of {E})")
        if n_inf:
            infinite.append(f"{col} ({n_inf} of {E})")
    notes = []
    if all_nan:
        notes.append(f"NaN in every dataset: {', '.join(all_nan)}")
    if some_nan:
        notes.append(f"NaN in some datasets: {', '.join(some_nan)}")
    if infinite:
        notes.append(f"infinite: {', '.join(infinite)}")
    return notes
