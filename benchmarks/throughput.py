"""Throughput of kdsim's Langevin engine against the samplers users would pick instead.

In ONE process and ONE run, on the same model, data and number of steps, it measures
particle-steps per second (one particle advanced one step; compilation timed apart,
median of repeats interleaved across the implementations of a row group,
``block_until_ready``) and memory of:

- ``kdsim engine``: kdsim's population engine (``kdsim.run_populations``, teacher phase);
- ``kdsim simulate``: a whole ``kdsim.simulate`` (engine, scratch student, estimators,
  bounds) at its defaults, against BlackJAX on the same model and particle count;
- ``minimal JAX``: a hand-written Langevin step, ``jax.grad`` of the energy on the data,
  vmap over particles, scan over steps, jit (what a JAX user writes: the practical limit);
- ``minimal JAX (suff. stats)``: the same with the linear task's sufficient statistics;
- ``BlackJAX sgld``: ``blackjax.sgld`` vmapped over per-chain keys (install it with
  ``pip install -r benchmarks/requirements.txt``: it is not a kdsim dependency);
- ``NumPy batched``: the linear chain in batched NumPy.

Every row carries its throughput ratio to the in-run ``minimal JAX`` kernel; ``--compare
OLD.json`` prints the change of those ratios per row and exits non-zero on a regression
(noise-aware: the tolerance grows with the spread of the repeats). It also shows that
the linear engine's per-step cost does not grow with n, and (``--million``) runs 10^6
linear-task particles through a whole ``simulate`` in particle chunks.

    python benchmarks/throughput.py --quick        # = kdsim bench, about 3 minutes on CPU
    python benchmarks/throughput.py                # all sizes (CPU: 64 .. 16,384 particles)
    python benchmarks/throughput.py --compare benchmarks/results/throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import kdsim
from kdsim.sharding import cpu_device_flags

cpu_device_flags()     # one CPU device per core, as the kdsim CLI does (before jax starts)
import kdsim.langevin
import kdsim.losses
import kdsim.models

HERE = os.path.dirname(os.path.abspath(__file__))
LINEAR = dict(d=32, k=4, n=256)
MLP = dict(d=8, k=2, n=64, width=64)
MLP_CLS = dict(d=16, K=3, n=128, width=64)     # the open-engine target row (teacher + student)


def _median_rates(runs: list[tuple[Callable, float]], repeats: int) -> list[tuple[float, float, float]]:
    """For each ``(fn, work)``: (median particle-steps/s, relative spread of the repeats,
    compile+first seconds).

    The repeats are interleaved (A B C, A B C, ...), so a slow spell of a shared machine
    falls on every implementation alike instead of on whichever ran through it: the
    ratios are then steadier than the rates.
    """
    first = []
    for fn, _ in runs:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first.append(time.perf_counter() - t0)
    times = [[] for _ in runs]
    for _ in range(repeats):
        for (fn, _), ts in zip(runs, times):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t0)
    out = []
    for (_, work), ts, c in zip(runs, times, first):
        med = statistics.median(ts)
        out.append((work / med, (max(ts) - min(ts)) / med if len(ts) > 1 else 0.0, c))
    return out


def _median_rate(fn, work: float, repeats: int) -> tuple[float, float, float]:
    return _median_rates([(fn, work)], repeats)[0]


def _xla_bytes(jitted, *args, **kwargs) -> float:
    """XLA's own estimate of a compiled program's memory (arguments + outputs + temporaries)."""
    try:
        m = jitted.lower(*args, **kwargs).compile().memory_analysis()
        return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return float("nan")


# ---------------------------------------------------------------------------------------
# problems


def linear_problem(P: int, n: int, d: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    W_star = rng.normal(size=(k, d)).astype(np.float32) / np.sqrt(d)
    Y = (X @ W_star.T + 0.5 * rng.normal(size=(n, k))).astype(np.float32)
    gamma = n / 0.25
    lam = gamma * (1 + np.sqrt(d / n)) ** 2 + 1.0
    return dict(X=X, Y=Y, gamma=np.float32(gamma), h=np.float32(0.1 / lam), P=P, k=k, d=d, n=n)


def _linear_energy(W, X, Y, gamma):
    r = Y - X @ W.T
    return gamma * 0.5 * jnp.mean(jnp.sum(r * r, axis=-1)) + 0.5 * jnp.sum(W * W)


@partial(jax.jit, static_argnames=("steps",))
def minimal_linear(key, W0, X, Y, gamma, h, *, steps):
    grad = jax.vmap(jax.grad(_linear_energy), in_axes=(0, None, None, None))

    def body(W, kt):
        xi = jax.random.normal(kt, W.shape, W.dtype)
        return W - h * grad(W, X, Y, gamma) + jnp.sqrt(2 * h) * xi, None

    return jax.lax.scan(body, W0, jax.random.split(key, steps))[0]


@partial(jax.jit, static_argnames=("steps",))
def minimal_linear_stats(key, W0, Cxx, Cyx, gamma, h, *, steps):
    def body(W, kt):
        xi = jax.random.normal(kt, W.shape, W.dtype)
        g = gamma * (W @ Cxx - Cyx) + W
        return W - h * g + jnp.sqrt(2 * h) * xi, None

    return jax.lax.scan(body, W0, jax.random.split(key, steps))[0]


def blackjax_linear(steps):
    import blackjax
    sgld = blackjax.sgld(lambda W, batch: -jax.grad(_linear_energy)(W, *batch))

    @jax.jit
    def run(key, W0, X, Y, gamma, h):
        def body(W, kt):
            keys = jax.random.split(kt, W.shape[0])     # one key per chain
            step = jax.vmap(lambda k_, w: sgld.step(k_, w, (X, Y, gamma), h))
            return step(keys, W), None
        return jax.lax.scan(body, W0, jax.random.split(key, steps))[0]

    return run


def numpy_linear(prob, steps, rng):
    """The chain in batched NumPy: per step two batched BLAS products over the data."""
    X, Y = prob["X"], prob["Y"]
    gamma, h, n = np.float32(prob["gamma"]), np.float32(prob["h"]), prob["n"]
    W = rng.normal(size=(prob["P"], prob["k"], prob["d"])).astype(np.float32)
    XT, YT, scale = np.ascontiguousarray(X.T), np.ascontiguousarray(Y.T), np.float32(np.sqrt(2 * h))
    for _ in range(steps):
        resid = W @ XT - YT                                           # (P, k, n)
        g = (gamma / n) * (resid @ X) + W                             # (P, k, d)
        W = W - h * g + scale * rng.standard_normal(W.shape, dtype=np.float32)
    return W


def kdsim_linear_cfg(prob, steps, E=1):
    return {"task": {"d": prob["d"], "k": prob["k"], "n": prob["n"]},
            "teacher": {"gamma": float(prob["gamma"]), "step_size": float(prob["h"]),
                        "num_steps": steps},
            "student": {"langevin": {"num_steps": 0}},
            "estimators": {"scratch": False, "girsanov": False},
            "num_datasets": E, "num_particles": prob["P"] // E}


# ---------------------------------------------------------------------------------------


def bench_linear(sizes, steps, repeats, have_blackjax, rows):
    for P in sizes:
        prob = linear_problem(P, **LINEAR)
        key = jax.random.key(0)
        W0 = jnp.asarray(np.random.default_rng(1).normal(size=(P, prob["k"], prob["d"])), jnp.float32)
        X, Y = jnp.asarray(prob["X"]), jnp.asarray(prob["Y"])
        Cxx, Cyx = X.T @ X / prob["n"], Y.T @ X / prob["n"]
        gamma, h = prob["gamma"], prob["h"]
        work = P * steps
        runs = []            # (impl, fn, work, bytes), measured together below

        def measure(impl, fn, nbytes, work=work):
            runs.append((impl, fn, work, nbytes))

        measure("minimal JAX", lambda: minimal_linear(key, W0, X, Y, gamma, h, steps=steps),
                _xla_bytes(minimal_linear, key, W0, X, Y, gamma, h, steps=steps))
        measure("minimal JAX (suff. stats)",
                lambda: minimal_linear_stats(key, W0, Cxx, Cyx, gamma, h, steps=steps),
                _xla_bytes(minimal_linear_stats, key, W0, Cxx, Cyx, gamma, h, steps=steps))
        if have_blackjax:
            run = blackjax_linear(steps)
            measure("BlackJAX sgld", lambda: run(key, W0, X, Y, gamma, h),
                    _xla_bytes(run, key, W0, X, Y, gamma, h))
        cfg = kdsim_linear_cfg(prob, steps)
        measure("kdsim engine", lambda: kdsim.run_populations(cfg, progress=False).populations.teacher,
                _engine_bytes(cfg))
        if P <= 4096:
            rng = np.random.default_rng(0)
            np_steps = max(10, steps // 10)
            measure("NumPy batched", lambda: numpy_linear(prob, np_steps, rng), float("nan"),
                    work=P * np_steps)
        rates = _median_rates([(fn, w) for _, fn, w, _ in runs], repeats)
        local = [dict(task="linear", particles=P, steps=steps, impl=impl, rate=r, spread=s,
                      compile_s=c, bytes=nbytes) for (impl, _, _, nbytes), (r, s, c) in zip(runs, rates)]
        for row in local:
            row["ratio"] = row["rate"] / local[0]["rate"]
        rows.extend(local)
        _print_rows(rows, P, "linear")


def _engine_bytes(cfg) -> float:
    """XLA's memory estimate for one scan segment of kdsim's teacher population."""
    from kdsim import populations
    from kdsim.config import SimConfig, resolve
    from kdsim.progress import SEGMENT_STEPS
    res = resolve(SimConfig.from_dict(cfg))
    st = res.static
    E, P = st.num_datasets, st.num_particles
    state = populations._initial_state(jnp.zeros((E, P, st.k, st.d), jnp.float32))
    keys = jax.random.split(jax.random.key(0), E * P).reshape(E, P)
    C, B = jnp.zeros((E, st.d, st.d)), jnp.zeros((E, st.k, st.d))
    p = jax.tree_util.tree_map(jnp.float32, res.numeric.teacher)
    seg = min(st.teacher_steps, SEGMENT_STEPS)
    return _xla_bytes(populations._linear_segment, state, None, jnp.int32(0), keys, C, B, C, B, p, p,
                      num_steps=seg, shared_B=True, girsanov=False, schedule="constant",
                      phase_steps=seg)


def bench_n_scaling(P, steps, repeats, n_values, rows):
    for n in n_values:
        prob = linear_problem(P, n, LINEAR["d"], LINEAR["k"])
        cfg = kdsim_linear_cfg(prob, steps)
        r, s, c = _median_rate(lambda: kdsim.run_populations(cfg, progress=False).populations.teacher,
                               P * steps, repeats)
        X, Y = jnp.asarray(prob["X"]), jnp.asarray(prob["Y"])
        W0 = jnp.zeros((P, prob["k"], prob["d"]), jnp.float32)
        m_steps = max(5, steps * 256 // max(n, 256))      # its cost grows with n: fewer steps
        rm, sm, _ = _median_rate(lambda: minimal_linear(jax.random.key(0), W0, X, Y, prob["gamma"], prob["h"],
                                                        steps=m_steps), P * m_steps, max(1, repeats - 1))
        rows.append({"n": n, "particles": P, "steps": steps, "kdsim engine": r, "kdsim spread": s,
                     "minimal JAX (data gradient)": rm})
        print(f"  n = {n:6d}: kdsim engine {r:.3g} particle-steps/s, minimal JAX {rm:.3g}", flush=True)


def _ntk_mlp(width: int, out: int, d: int):
    """The built-in NTK MLP (one hidden layer) as kdsim prepares it, and initial particles."""
    prep = kdsim.models.prepare(kdsim.models.builtin(kdsim.ModelConfig(width=width), out, (d,)),
                                role="teacher_model", input_shape=(d,), out=out, dtype="float32")
    zeros = prep.structure.zeros(jnp.float32)
    init = lambda key, P: jax.vmap(lambda k: kdsim.langevin.gaussian_like(k, zeros))(jax.random.split(key, P))
    return prep.apply, init


def bench_mlp(sizes, steps, repeats, have_blackjax, rows,
              tasks=("mlp_regression", "mlp_classification")):
    """The MLP engine (autodiff gradients) against a minimal vmapped ``jax.grad`` Langevin
    kernel on the same NTK MLP: regression (teacher phase) and classification (teacher
    and KD student phases, both width MLP_CLS["width"]; the minimal kernel runs the same
    number of particle-steps on the teacher's energy). ``tasks`` picks which of the two."""
    for task, spec, phases in (("mlp_regression", MLP, 1), ("mlp_classification", MLP_CLS, 2)):
        if task not in tasks:
            continue
        classification = task == "mlp_classification"
        out = spec["K"] if classification else spec["k"]
        apply, init = _ntk_mlp(spec["width"], out, spec["d"])
        rng = np.random.default_rng(0)
        X = jnp.asarray(rng.normal(size=(spec["n"], spec["d"])), jnp.float32)
        Y = (jnp.asarray(rng.integers(0, out, spec["n"])) if classification
             else jnp.asarray(rng.normal(size=(spec["n"], out)), jnp.float32))
        gamma = float(spec["n"]) if classification else spec["n"] / 0.25
        h = jnp.float32(1e-3)
        energy = lambda w: gamma * kdsim.losses.task_risk(apply(w, X), Y, classification) \
            + 0.5 * sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(w))
        total = phases * steps
        for P in sizes:
            w0 = init(jax.random.key(1), P)
            work = P * total
            base = dict(task=task, particles=P, steps=total)

            @jax.jit
            def minimal(key, w):
                grad = jax.vmap(jax.grad(energy))

                def body(w, kt):
                    leaves, tdef = jax.tree_util.tree_flatten(w)
                    ks = jax.random.split(kt, len(leaves))
                    noise = tdef.unflatten([jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(ks, leaves)])
                    g = grad(w)
                    return jax.tree_util.tree_map(lambda a, b, c: a - h * b + jnp.sqrt(2 * h) * c, w, g, noise), None

                return jax.lax.scan(body, w, jax.random.split(key, total))[0]

            runs = [("minimal JAX", lambda: minimal(jax.random.key(0), w0),
                     _xla_bytes(minimal, jax.random.key(0), w0))]
            if have_blackjax:
                import blackjax
                sgld = blackjax.sgld(lambda w, batch: jax.tree_util.tree_map(jnp.negative, jax.grad(energy)(w)))

                @jax.jit
                def bj(key, w):
                    def body(w, kt):
                        keys = jax.random.split(kt, P)
                        return jax.vmap(lambda k_, x: sgld.step(k_, x, None, h))(keys, w), None
                    return jax.lax.scan(body, w, jax.random.split(key, total))[0]

                runs.append(("BlackJAX sgld", lambda: bj(jax.random.key(0), w0),
                             _xla_bytes(bj, jax.random.key(0), w0)))
            task_cfg = {"name": task, "d": spec["d"], "n": spec["n"], "n_test": 16}
            task_cfg.update({"num_classes": out} if classification else {"k": out})
            cfg = {"task": task_cfg,
                   "teacher": {"num_steps": steps, "model": {"width": spec["width"]}, "gamma": gamma},
                   "student": {"langevin": {"num_steps": steps if phases == 2 else 0},
                               "model": {"width": spec["width"]}},
                   "estimators": {"scratch": False, "girsanov": False},
                   "num_datasets": 1, "num_particles": P}
            runs.append(("kdsim engine", lambda: kdsim.run_populations(cfg, progress=False).populations.student,
                         float("nan")))
            rates = _median_rates([(fn, work) for _, fn, _ in runs], repeats)
            for (impl, _, nbytes), (r, s, c) in zip(runs, rates):
                rows.append({**base, "impl": impl, "rate": r, "spread": s, "compile_s": c,
                             "bytes": nbytes, "ratio": r / rates[0][0]})
            _print_rows(rows, P, task)


def bench_simulate(repeats, have_blackjax, rows):
    """A whole default simulate (4,096 particles, 2000 + 2000 steps + scratch, every estimator)
    against BlackJAX on the same model and particle count."""
    cfg = kdsim.SimConfig()
    res = kdsim.config.resolve(cfg)
    st = res.static
    work = st.num_datasets * st.num_particles * (st.teacher_steps + 2 * st.student_steps)
    P = st.num_datasets * st.num_particles
    base = dict(task="linear default simulate", particles=P, steps=st.teacher_steps + 2 * st.student_steps)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (r, s, c), = _median_rates(
        [(lambda: kdsim.simulate(cfg, progress=False).per_dataset["gen_S"].to_numpy(), work)], 1)
    first = c
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024.0
    if have_blackjax:
        prob = dict(linear_problem(P, n=st.n, d=st.d, k=st.k))
        prob["gamma"], prob["h"] = np.float32(res.numeric.teacher.gamma), np.float32(res.numeric.teacher.step_size)
        steps = 500
        run = blackjax_linear(steps)
        X, Y = jnp.asarray(prob["X"]), jnp.asarray(prob["Y"])
        W0 = jnp.zeros((P, st.k, st.d), jnp.float32)
        # measured together, repeats interleaved (the simulate's peak memory was taken above)
        (r, s, _), (rb, sb, cb) = _median_rates(
            [(lambda: kdsim.simulate(cfg, progress=False).per_dataset["gen_S"].to_numpy(), work),
             (lambda: run(jax.random.key(0), W0, X, Y, prob["gamma"], prob["h"]), P * steps)],
            max(2, repeats - 1))
    rows.append({**base, "impl": "kdsim simulate", "rate": r, "spread": s, "compile_s": first,
                 "bytes": rss, "ratio": float("nan")})
    if have_blackjax:
        rows.append({**base, "impl": "BlackJAX sgld", "rate": rb, "spread": sb, "compile_s": cb,
                     "bytes": _xla_bytes(run, jax.random.key(0), W0, X, Y, prob["gamma"], prob["h"]),
                     "ratio": float("nan")})
        rows[-2]["vs BlackJAX"] = r / rb
    print(f"  whole simulate: {r:.3g} particle-steps/s" +
          (f" = {rows[-2]['vs BlackJAX']:.2f}x BlackJAX" if have_blackjax else ""), flush=True)


# PERF-NOTES "Where a whole simulate spends its time": the engine alone is cheap here, so
# any per-dataset host work of the evaluation shows
STAGES_LEAN = {"task": {"d": 32, "k": 1, "n": 256}, "num_datasets": 32, "num_particles": 32,
               "teacher": {"num_steps": 2000}, "student": {"langevin": {"num_steps": 2000}},
               "estimators": {"scratch": False, "girsanov": False}}
STAGE_NAMES = ("engine", "closed_forms", "estimators", "bounds", "tables")


def stage_configs(quick: bool) -> dict[str, dict]:
    """The configurations of the evaluation-cost targets (issue 16)."""
    wide = {"num_datasets": 256}
    if quick:
        wide["num_particles"] = 32          # 256 x 256 x 6000 steps is minutes on a CPU
    return {"lean (d=32, k=1, 32 x 32, no scratch/Girsanov)": STAGES_LEAN, "default": {},
            f"default, 256 datasets x {wide.get('num_particles', 256)} particles": wide}


def bench_stages(repeats, quick, rows):
    """A whole simulate against the engine alone (``run_populations``) on the same config,
    repeats interleaved, and the simulate's seconds per stage (``meta["timings"]``)."""
    for name, cfg in stage_configs(quick).items():
        results = []

        def sim():
            results.append(kdsim.simulate(cfg, progress=False))
            return results[-1].per_dataset["gen_S"].to_numpy()

        def engine():
            return jax.tree_util.tree_leaves(kdsim.run_populations(cfg, progress=False).populations)

        (rs, ss, cs), (re, se, ce) = _median_rates([(sim, 1.0), (engine, 1.0)], repeats)
        t_sim, t_eng = 1.0 / rs, 1.0 / re
        timed = sorted(results[1:], key=lambda r: r.meta["total_seconds"])
        mid = timed[len(timed) // 2].meta
        stages = dict(mid.get("timings", {}))
        stages.setdefault("engine", mid["engine_seconds"])
        evaluation = mid["total_seconds"] - mid["engine_seconds"]
        row = {"config": name, "simulate_s": t_sim, "engine_s": t_eng, "simulate_over_engine": t_sim / t_eng,
               "spread": max(ss, se), "in_run_engine_s": mid["engine_seconds"],
               "in_run_total_s": mid["total_seconds"], "evaluation_s": evaluation,
               "evaluation_over_engine": evaluation / mid["engine_seconds"], "stages": stages,
               "first_call_s": cs}
        rows.append(row)
        print(f"  {name}: simulate {t_sim:.2f} s, engine {t_eng:.2f} s ({t_sim / t_eng:.2f}x); "
              f"evaluation {evaluation:.2f} s = {row['evaluation_over_engine']:.0%} of the engine; "
              + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), flush=True)


def bench_lean_engine(repeats, have_blackjax, rows):
    """Issue 16's engine target on the lean config: kdsim's engine (teacher + student,
    ``run_populations``) against a minimal ``jax.grad`` kernel and BlackJAX sgld run for
    the same teacher + student steps on the same model and particle count (the student
    phase is timed as a second teacher-like run: its per-particle targets would only
    make the baselines slower). The engine is also timed without the trajectory sums."""
    st = kdsim.config.resolve(kdsim.SimConfig.from_dict(STAGES_LEAN)).static
    P, steps = st.num_datasets * st.num_particles, st.teacher_steps + st.student_steps
    prob = linear_problem(P, n=st.n, d=st.d, k=st.k)
    key = jax.random.key(0)
    W0 = jnp.zeros((P, st.k, st.d), jnp.float32)
    X, Y, gamma, h = jnp.asarray(prob["X"]), jnp.asarray(prob["Y"]), prob["gamma"], prob["h"]
    no_traj = {**STAGES_LEAN, "estimators": {**STAGES_LEAN["estimators"], "trajectory_bounds": False}}
    runs = [("kdsim engine", lambda: jax.tree_util.tree_leaves(
                kdsim.run_populations(STAGES_LEAN, progress=False).populations)),
            ("kdsim engine, no trajectory sums", lambda: jax.tree_util.tree_leaves(
                kdsim.run_populations(no_traj, progress=False).populations)),
            ("minimal JAX", lambda: [minimal_linear(key, W0, X, Y, gamma, h, steps=st.teacher_steps),
                                     minimal_linear(key, W0, X, Y, gamma, h, steps=st.student_steps)])]
    if have_blackjax:
        run_T, run_S = blackjax_linear(st.teacher_steps), blackjax_linear(st.student_steps)
        runs.append(("BlackJAX sgld", lambda: [run_T(key, W0, X, Y, gamma, h), run_S(key, W0, X, Y, gamma, h)]))
    rates = _median_rates([(fn, 1.0) for _, fn in runs], repeats)
    seconds = {name: 1.0 / r for (name, _), (r, _, _) in zip(runs, rates)}
    spread = max(s for _, s, _ in rates)
    rows.append({"config": "lean (d=32, k=1, 32 x 32, no scratch/Girsanov)", "particles": P,
                 "steps": steps, "seconds": seconds, "spread": spread})
    print("  lean engine, teacher + student: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()),
          flush=True)


MILLION = {"num_datasets": 256, "num_particles": 4096, "particle_chunk": 1024,
           "teacher": {"num_steps": 100}, "student": {"langevin": {"num_steps": 100}},
           "estimators": {"scratch": False}}


def bench_million(rows):
    """2^20 linear-task particles (default task; 256 datasets x 4,096) through a whole
    simulate, with the engine advancing 256 x 1,024 chains at a time."""
    from kdsim import memory
    res_cfg = kdsim.config.resolve(kdsim.SimConfig.from_dict(MILLION))
    est = memory.estimate(res_cfg)
    t0 = time.perf_counter()
    res = kdsim.simulate(MILLION, progress=False)
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    z = (res.per_dataset["gen_S"] - res.per_dataset["gen_S_exact"]) / res.per_dataset["gen_S_se"]
    rows.append({"particles": 256 * 4096, "steps": 200, "seconds": secs, "peak_rss_bytes": rss,
                 "engine_estimate_bytes": est.engine_bytes, "host_estimate_bytes": est.host_bytes,
                 "engine_seconds": res.meta["engine_seconds"],
                 "gen_S": float(res.summary.loc["gen_S", "mean"]),
                 "gen_S_exact": float(res.summary.loc["gen_S_exact", "mean"]),
                 "max_abs_z_gen_S": float(np.abs(z).max())})
    print(f"  2^20 particles: {secs:.0f} s, peak RSS {rss / 2**30:.1f} GiB", flush=True)


def bench_precision(rows):
    """The engine's matmul precision: its effect on the estimates and on the time."""
    cfg = {"task": dict(LINEAR), "teacher": {"num_steps": 500}, "student": {"langevin": {"num_steps": 500}},
           "estimators": {"scratch": False}, "num_datasets": 8, "num_particles": 1024}
    out = {}
    for prec in ("default", "highest"):
        c = {**cfg, "engine_precision": prec}
        kdsim.simulate(c, progress=False)                       # compile
        t0 = time.perf_counter()
        out[prec] = kdsim.simulate(c, progress=False)
        out[prec + "_s"] = time.perf_counter() - t0
    a, b = out["default"].per_dataset, out["highest"].per_dataset
    for col in ("gen_T", "gen_S", "kl_gaussian_full", "kl_girsanov", "B1_upper"):
        if col not in a:
            continue
        diff = np.abs(a[col].to_numpy(float) - b[col].to_numpy(float))
        se = b.get(col + "_se")
        rows.append({"column": col, "max_abs_diff": float(np.nanmax(diff)),
                     "max_diff_over_se": float(np.nanmax(diff / se.to_numpy(float))) if se is not None else float("nan"),
                     "seconds_default": out["default_s"], "seconds_highest": out["highest_s"]})
    print(f"  precision: default {out['default_s']:.1f} s, highest {out['highest_s']:.1f} s", flush=True)


def _print_rows(rows, P, task):
    for row in rows:
        if row.get("particles") == P and row.get("task") == task and not row.get("_printed"):
            print(f"  {task:15s} P={P:7d} {row['impl']:28s} {row['rate']:10.3g} particle-steps/s"
                  f"  x{row.get('ratio', float('nan')):.2f} minimal  (compile+first {row['compile_s']:.1f} s)",
                  flush=True)
            row["_printed"] = True


def machine() -> dict:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device": getattr(dev, "device_kind", str(dev)),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "jax": jax.__version__,
            "kdsim": kdsim.io.kdsim_version(), "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Throughput ({m['device']}, {m['platform']})", "",
             f"{m['cpu_count']} CPUs, {m['machine']}, Python {m['python']}, JAX {m['jax']}, "
             f"kdsim {m['kdsim']}, {m['date']}. Particle-steps per second (one particle advanced "
             "one step), median of repeats (interleaved across the implementations of a row group) "
             "after a compiling first call; `x minimal` = ratio to "
             "the in-run minimal JAX kernel (data-gradient) of the same task and size; memory = "
             "XLA's estimate for the compiled program (arguments + outputs + temporaries), or "
             "the process RSS growth for a whole simulate.", "",
             f"Reproduce: `python benchmarks/throughput.py {result['args']}`.", "",
             "| task | particles | steps | implementation | particle-steps/s | x minimal | spread | compile + first (s) | memory (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['particles']} | {r['steps']} | {r['impl']} | {r['rate']:.3g} | "
                     f"{r.get('ratio', float('nan')):.2f} | {r['spread']:.2f} | {r['compile_s']:.1f} | "
                     f"{r['bytes'] / 2**20:.1f} |")
    for r in result["rows"]:
        if "vs BlackJAX" in r:
            lines += ["", f"Whole default `simulate`: {r['rate']:.3g} particle-steps/s = "
                      f"**{r['vs BlackJAX']:.2f}x BlackJAX** on the same model and particle count."]
    if result.get("stages"):
        lines += ["", "## Evaluation cost: a whole simulate against the engine alone", "",
                  "Median of 3 interleaved repeats after a warm-up; `evaluation` = the simulate's "
                  "total minus its engine seconds (same run); stages from `Result.meta[\"timings\"]` "
                  "(seconds, exclusive).", "",
                  "| config | simulate (s) | engine (s) | simulate / engine | evaluation / engine | "
                  + " | ".join(STAGE_NAMES) + " |", "|---" * (5 + len(STAGE_NAMES)) + "|"]
        for r in result["stages"]:
            st = r["stages"]
            lines.append(f"| {r['config']} | {r['simulate_s']:.2f} | {r['engine_s']:.2f} | "
                         f"{r['simulate_over_engine']:.2f} | {r['evaluation_over_engine']:.0%} | "
                         + " | ".join(f"{st[k]:.2f}" if k in st else "–" for k in STAGE_NAMES) + " |")
    for r in result.get("engine_vs", []):
        sec = r["seconds"]
        lines += ["", f"## The engine against the baselines: {r['config']}", "",
                  f"{r['particles']:,} particles, {r['steps']:,} steps (teacher + student), seconds, "
                  "median of interleaved repeats after a compiling first call:", "",
                  "| implementation | seconds | engine speed-up |", "|---|---|---|"]
        for name, v in sec.items():
            lines.append(f"| {name} | {v:.2f} | {v / sec['kdsim engine']:.2f}x |")
    targets = targets_met(result)
    if targets:
        lines += ["", "## Targets", ""] + [f"- {t}" for t in targets]
    if result.get("n_scaling"):
        lines += ["", "## The linear fast path: per-step cost against n", "",
                  "| n | particles | kdsim engine | minimal JAX (data gradient) |", "|---|---|---|---|"]
        for r in result["n_scaling"]:
            lines.append(f"| {r['n']} | {r['particles']} | {r['kdsim engine']:.3g} | "
                         f"{r['minimal JAX (data gradient)']:.3g} |")
    if result.get("precision"):
        p0 = result["precision"][0]
        lines += ["", "## Engine matmul precision (`engine_precision`)", "",
                  f"Linear d = 32, k = 4, n = 256, 8 x 1,024 particles, 500 + 500 steps: whole "
                  f"simulate {p0['seconds_default']:.1f} s at `default`, {p0['seconds_highest']:.1f} s "
                  "at `highest`. Largest change of a per-dataset estimate:", "",
                  "| column | max abs change | in standard errors |", "|---|---|---|"]
        for r in result["precision"]:
            lines.append(f"| {r['column']} | {r['max_abs_diff']:.3g} | {r['max_diff_over_se']:.3g} |")
    if result.get("million"):
        r = result["million"][0]
        lines += ["", "## 2^20 particles on one machine", "",
                  f"{r['particles']:,} linear-task particles (the default task, d = 8, k = 2, n = 64; 256 datasets x "
                  f"4,096 particles, the engine advancing 256 x 1,024 chains at a time: "
                  f"`particle_chunk = 1024`), {r['steps']} steps, whole `simulate` with every "
                  f"estimator: {r['seconds']:.0f} s ({r['engine_seconds']:.0f} s engine), peak RSS "
                  f"{r['peak_rss_bytes'] / 2**30:.1f} GiB (up-front estimate: engine "
                  f"{r['engine_estimate_bytes'] / 2**30:.2f} GiB per chunk, host "
                  f"{r['host_estimate_bytes'] / 2**30:.1f} GiB); mean gen_S {r['gen_S']:.4f} vs exact "
                  f"{r['gen_S_exact']:.4f}, largest per-dataset |z| {r['max_abs_z_gen_S']:.2f}."]
    return "\n".join(lines) + "\n"


def targets_met(result) -> list[str]:
    out = []
    gpu = result["machine"]["platform"] == "gpu"
    need_bj = 3.0 if gpu else 4.0
    by = {}
    for r in result["rows"]:
        by.setdefault((r["task"], r["particles"]), {})[r["impl"]] = r
    verdict = lambda ok: "met" if ok else "NOT met"
    for (task, P), impls in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        eng, bj = impls.get("kdsim engine"), impls.get("BlackJAX sgld")
        if eng is None or P < 1024:
            continue
        # the open-engine target: autodiff MLP engine >= 0.9x a minimal jax.grad kernel
        need = 0.9 if task == "mlp_classification" else 0.8
        line = (f"{task}, {P} particles: engine {eng['ratio']:.2f}x the minimal kernel "
                f"(target >= {need:g}): {verdict(eng['ratio'] >= need)}")
        if bj is not None and not task.startswith("mlp"):
            x = eng["rate"] / bj["rate"]
            line += f"; {x:.2f}x BlackJAX (target >= {need_bj:g}): {verdict(x >= need_bj)}"
        out.append(line)
    for i, r in enumerate(result.get("stages", [])):
        if i == 0:
            out.append(f"{r['config']}: whole simulate {r['simulate_over_engine']:.2f}x the engine "
                       f"(target <= 1.3): {verdict(r['simulate_over_engine'] <= 1.3)}")
        else:
            out.append(f"{r['config']}: evaluation {r['evaluation_over_engine']:.0%} of the engine "
                       f"(target < 20%): {verdict(r['evaluation_over_engine'] < 0.2)}")
    for r in result.get("engine_vs", []):
        sec = r["seconds"]
        for base in ("minimal JAX", "BlackJAX sgld"):
            if base in sec:
                x = sec[base] / sec["kdsim engine"]
                out.append(f"{r['config']}: engine (teacher + student) {x:.2f}x {base} "
                           f"(target >= 1.8): {verdict(x >= 1.8)}")
    for r in result["rows"]:
        if "vs BlackJAX" in r and not gpu:
            out.append(f"whole default simulate: {r['vs BlackJAX']:.2f}x BlackJAX (target >= 2 on CPU): "
                       f"{verdict(r['vs BlackJAX'] >= 2)}")
    return out


def compare(new: dict, old_path: str) -> int:
    """Per row, the change of the ratio to the in-run minimal kernel; non-zero on regression."""
    with open(old_path) as fh:
        old = json.load(fh)
    index = {(r["task"], r["particles"], r["impl"]): r for r in old["rows"]}
    # a ratio carries the noise of its row and of the minimal kernel it is divided by
    base = lambda rows: {(r["task"], r["particles"]): r["spread"] for r in rows if r["impl"] == "minimal JAX"}
    base_new, base_old = base(new["rows"]), base(old["rows"])
    worst = 0
    print(f"\ncompared with {old_path} ({old['machine']['device']}):")
    for r in new["rows"]:
        o = index.get((r["task"], r["particles"], r["impl"]))
        if o is None or not np.isfinite(r.get("ratio", np.nan)) or not np.isfinite(o.get("ratio", np.nan)):
            continue
        change = r["ratio"] / o["ratio"] - 1
        key = (r["task"], r["particles"])
        tol = max(0.10, 3 * float(np.sqrt(r["spread"] ** 2 + o["spread"] ** 2 + base_new.get(key, 0.0) ** 2
                                          + base_old.get(key, 0.0) ** 2)))
        flag = "REGRESSION" if change < -tol else ""
        worst |= bool(flag)
        print(f"  {r['task']:24s} {r['particles']:8d} {r['impl']:28s} {change:+7.1%} (tolerance {tol:.0%}) {flag}")
    return 1 if worst else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,024 and 4,096 particles, fewer repeats")
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mlp", action="store_true")
    ap.add_argument("--million", action="store_true", help="also run 2^20 particles in chunks")
    ap.add_argument("--stages-only", action="store_true",
                    help="only the evaluation-cost targets (simulate vs engine, seconds per stage)")
    ap.add_argument("--compare", help="a previous JSON result: report ratio changes, fail on regression")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput_<platform>.json)")
    args = ap.parse_args()
    gpu = jax.devices()[0].platform == "gpu"
    try:
        import blackjax  # noqa: F401
        have_blackjax = True
    except ImportError:
        have_blackjax = False
        print("BlackJAX not installed: pip install -r benchmarks/requirements.txt (its rows are skipped)")
    if args.sizes:
        sizes = args.sizes
    elif args.quick:
        sizes = [1024, 4096] if not gpu else [16384, 1 << 20]
    else:
        sizes = [64, 256, 1024, 4096, 16384] if not gpu else [1024, 16384, 1 << 18, 1 << 20]
    steps = args.steps or (100 if args.quick and not gpu else 500)
    repeats = 2 if args.quick else args.repeats
    rows, n_rows, million, stage_rows, precision = [], [], [], [], []
    print("evaluation cost (whole simulate against the engine alone):", flush=True)
    bench_stages(3, args.quick, stage_rows)
    engine_rows = []
    bench_lean_engine(3, have_blackjax, engine_rows)
    if args.stages_only:
        return _write(args, gpu, {"machine": machine(), "args": " ".join(sys.argv[1:]), "rows": [],
                                  "stages": stage_rows, "engine_vs": engine_rows})
    print(f"kdsim throughput on {jax.devices()[0]} ({len(sizes)} sizes, {steps} steps)", flush=True)
    bench_linear(sizes, steps, repeats, have_blackjax, rows)
    if not args.no_mlp:
        bench_mlp([s for s in sizes if s <= (4096 if not gpu else 1 << 16)][:2], max(20, steps // 5),
                  repeats, have_blackjax, rows)
    bench_simulate(repeats, have_blackjax, rows)
    print("n-scaling of the linear engine:", flush=True)
    bench_n_scaling(1024, steps, repeats, [64, 1024, 16384, 65536] if args.quick
                    else [64, 256, 1024, 4096, 16384, 65536], n_rows)
    print("engine precision:", flush=True)
    bench_precision(precision)
    if args.million:
        print("2^20 particles:", flush=True)
        bench_million(million)
    for r in rows:
        r.pop("_printed", None)
    # what reproduces the numbers (where a result was written or compared is not part of it)
    measured = [a for a, prev in zip(sys.argv[1:], [""] + sys.argv[1:])
                if a not in ("--compare", "--out") and prev not in ("--compare", "--out")]
    result = {"machine": machine(), "args": " ".join(measured), "rows": rows,
              "n_scaling": n_rows, "million": million, "precision": precision, "stages": stage_rows,
              "engine_vs": engine_rows}
    return _write(args, gpu, result)


def _write(args, gpu, result) -> int:
    plat = "gpu" if gpu else "cpu"
    tag = "_stages" if args.stages_only else ("_quick" if args.quick else "")
    out = args.out or os.path.join(HERE, "results", f"throughput_{plat}{tag}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    md = markdown(result)
    with open(out[:-5] + ".md", "w") as fh:
        fh.write(md)
    print("\n" + md)
    print(f"written {out} and {out[:-5]}.md")
    return compare(result, args.compare) if args.compare else 0


if __name__ == "__main__":
    raise SystemExit(main())
