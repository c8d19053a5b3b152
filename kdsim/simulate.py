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

from . import distributed, memory, populations, streams
from .config import ConfigError, Resolved, SimConfig, linear_curvature_estimate, resolve
from .evaluation import linear_columns
from .evaluation_mlp import mlp_columns
from .progress import Progress
from .progress import enabled as progress_enabled
from .result import Result, summarize
from .tasks import linear_gaussian as lg
from .tasks import mlp as mlp_task
from .timing import StageTimer


class DivergenceError(RuntimeError):
    """Too many chains blew up; ``.run`` holds everything computed (nothing is lost)."""

    def __init__(self, message: str, run: "Run"):
        super().__init__(message)
        self.run = run


class Run(NamedTuple):
    """Everything a run produced before estimation."""

    config: SimConfig
    resolved: Resolved
    data: Any                      # tasks.linear_gaussian.LinearData | tasks.mlp.MLPData
    populations: populations.Populations
    seconds: float


LinearRun = Run   # backwards-compatible name


def _as_config(config: SimConfig | Mapping[str, Any]) -> SimConfig:
    if isinstance(config, SimConfig):
        return config
    if isinstance(config, Mapping):
        return SimConfig.from_dict(config)
    raise ConfigError(f"config must be a SimConfig or a mapping, got {type(config).__name__}")


def run_populations(config: SimConfig | Mapping[str, Any], progress: bool | None = None) -> Run:
    """Draw the datasets and train the teacher and student populations (no estimation).

    For notebooks and tests that need the particles themselves. ``progress``: show a
    progress bar (default: on a terminal, off when ``CI`` is set).
    """
    cfg = _as_config(config)
    res = resolve(cfg)
    memory.check(res, evaluate=False)
    return _populations(cfg, res, progress)


def _populations(cfg: SimConfig, res: Resolved, progress: bool | None) -> Run:
    st = res.static
    chunks = -(-st.num_particles // st.particle_chunk)
    steps = (st.teacher_steps + st.student_steps * (2 if res.scratch else 1)) * chunks
    with Progress(steps, "kdsim run", enabled=progress_enabled(progress)) as bar:
        return _run(cfg, res, bar)


def _run(cfg: SimConfig, res: Resolved, bar: Progress) -> Run:
    """Draw the data, then train the population chunk by chunk of particles.

    Every draw is keyed by global dataset and particle index, so a chunked run draws
    exactly the numbers of an unchunked one and, its arithmetic being per-chain chains in
    a fixed order (:mod:`kdsim.ordered`), ends in bit-identical states; only
    ``num_datasets x particle_chunk`` chains are on the device at a time. Under
    multi-host JAX each process trains its share of the datasets (or particles) and the
    shares are gathered on every process.
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
        classification = st.task == "mlp_classification"
        make = lambda ds: mlp_task.make_data(
            root, ds, n=st.n, d=st.d, out=st.num_classes if classification else st.k,
            n_test=st.n_test, planted_width=st.planted_width, planted_scale=nm.planted_scale,
            noise=nm.noise, classification=classification)
        engine = populations.run_mlp
    data = make(np.arange(st.num_datasets))
    share = distributed.process_share(st.num_datasets, st.num_particles)
    with jax.default_matmul_precision(st.engine_precision):
        local = _train(engine, root, res, make(share.datasets) if share.axis == 0 else data,
                       share.datasets, share.particles, bar)
    pops = distributed.gather_populations(local, share)
    return Run(cfg, res, data, pops, time.perf_counter() - t0)


def _train(engine, root, res: Resolved, data, datasets: np.ndarray, particles: np.ndarray,
           bar: Progress) -> populations.Populations:
    """The given (global) datasets and particles, ``particle_chunk`` particles at a time."""
    P = len(particles)
    chunk = min(res.static.particle_chunk, P)
    if len(datasets) * chunk < 2:
        # never a batch of ONE chain: XLA compiles it without the batch axis, and its
        # float32 arithmetic can then differ in the last bit (kdsim.ordered); a second,
        # dropped chain keeps every batch alike
        chunk = 2
    # every chunk has the same shape (the last one padded with extra chains that are
    # dropped): one compiled program, and the same arithmetic for every particle
    ids = np.concatenate([particles, particles[-1] + 1 + np.arange(-P % chunk)])
    parts = [engine(root, res, data, datasets, ids[lo:lo + chunk], bar) for lo in range(0, P, chunk)]
    return parts[0] if len(parts) == 1 and chunk == P else populations.concatenate(parts, P)


def simulate(config: SimConfig | Mapping[str, Any], progress: bool | None = None) -> Result:
    """Run one simulation and estimate every quantity of the theory.

    Args:
      config: a :class:`SimConfig` or a (partial) mapping accepted by ``SimConfig.from_dict``.
      progress: show a progress bar over the Langevin steps (default: on a terminal,
        off when the environment variable ``CI`` is set).
    Returns:
      a :class:`Result` with ``per_dataset`` (one row per dataset), ``summary``,
      ``datasets``, ``config`` and ``notes``.
    """
    t0 = time.perf_counter()
    cfg = _as_config(config)
    res = resolve(cfg)
    memory.check(res)                      # the estimators' memory too, before any work
    run = _populations(cfg, res, progress)
    check_divergence(run)
    timer = StageTimer()
    if run.resolved.static.task == "linear_gaussian":
        per_dataset, pooled, notes = linear_columns(run, timer)
        datasets = {"X": run.data.X, "Y": run.data.Y, "W_star": run.data.W_star}
    else:
        per_dataset, pooled, notes = mlp_columns(run, timer)
        datasets = {"X": run.data.X.astype(np.float64), "Y": run.data.Y,
                    "planted_A": run.data.A, "planted_B": run.data.B}
    with timer("tables"):
        summary = summarize(per_dataset, seed=run.config.seed)
        notes = list(run.resolved.warnings) + notes + summary_notes(per_dataset)
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
    return Result(config=run.config, per_dataset=per_dataset, summary=summary,
                  datasets=datasets, notes=notes, meta=meta, pooled=pooled)


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
            stable = 2.0 / linear_curvature_estimate(cfg.task, p.gamma, p.prior_scale)
            hint += f"; the stability estimate is {stable:.3g}"
        raise DivergenceError(
            f"{int(diverged.sum())} of {diverged.size} {who} chains diverged ({frac:.0%}{first}), "
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
