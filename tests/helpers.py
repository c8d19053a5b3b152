"""Shared test helpers: small configs and an independent NumPy oracle."""

from __future__ import annotations

import jax
import numpy as np
from scipy import stats as sps

from kdsim import SimConfig
from kdsim.config import resolve
from kdsim.streams import root_key
from kdsim.tasks import linear_gaussian as lg

# Parameters deliberately differ between teacher and student (gamma, prior, init, steps,
# and hence the default step size), so a mix-up between the two cannot go unnoticed;
# the step counts stop far from stationarity, so finite-time effects are visible.
SCRAMBLED = {
    "task": {"d": 4, "k": 2, "n": 32, "noise": 0.6, "input_decay": 0.5},
    "teacher": {"gamma": 60.0, "prior_scale": 0.8, "init_scale": 1.3, "num_steps": 70},
    "student": {"langevin": {"gamma": 35.0, "prior_scale": 1.5, "init_scale": 0.6,
                             "num_steps": 50}},
}


def flat_states(tree) -> np.ndarray:
    """Particle states ``(E, P, ...)``, a pytree for MLPs, as one ``(E, P, -1)`` array."""
    return np.concatenate([np.reshape(x, np.shape(x)[:2] + (-1,)) for x in jax.tree_util.tree_leaves(tree)], -1)


def config(**overrides) -> SimConfig:
    base = SimConfig.from_dict(SCRAMBLED)
    return base.replace(overrides) if overrides else base


def data_for(cfg: SimConfig) -> lg.LinearData:
    st, nm = resolve(cfg).static, resolve(cfg).numeric
    return lg.make_data(root_key(cfg.seed), np.arange(cfg.num_datasets), n=st.n, d=st.d, k=st.k,
                        rank=st.rank, full_student=st.full_student, noise=nm.noise,
                        input_scale=nm.input_scale, input_decay=nm.input_decay,
                        signal_decay=nm.signal_decay)


def propagate_joint(Cxx, Cyx_row, Pi, n, numeric, T_T, T_S):
    """Mean and covariance of z = (w, u, v) for one output row, step by step (SPEC §3).

    Independent of kdsim.closed_form: it applies z <- F z + f + N(0, Q) literally.
    """
    pt, ps = numeric.teacher, numeric.student
    a, nu_T = numeric.alpha, numeric.teacher_noise
    d, r = Pi.shape
    D = d + 2 * r
    sw, su, sv = slice(0, d), slice(d, d + r), slice(d + r, D)
    mu = np.zeros(D)
    S = np.zeros((D, D))
    S[sw, sw] = pt.init_scale**2 * np.eye(d)
    S[su, su] = ps.gamma**2 / n * Pi.T @ Cxx @ Pi
    S[sv, sv] = ps.init_scale**2 * np.eye(r)
    A_T = pt.gamma * Cxx + np.eye(d) / pt.prior_scale**2
    F = np.eye(D)
    F[sw, sw] = np.eye(d) - pt.step_size * A_T
    f = np.zeros(D)
    f[sw] = pt.step_size * pt.gamma * Cyx_row
    Q = np.zeros((D, D))
    Q[sw, sw] = 2 * pt.step_size * np.eye(d)
    for _ in range(T_T):
        mu = F @ mu + f
        S = F @ S @ F.T + Q
    A_S = ps.gamma * Pi.T @ Cxx @ Pi + np.eye(r) / ps.prior_scale**2
    h = ps.step_size
    F = np.eye(D)
    F[sv, sv] = np.eye(r) - h * A_S
    F[sv, sw] = h * (1 - a) * ps.gamma * Pi.T @ Cxx
    F[sv, su] = h * (1 - a) * nu_T * np.eye(r)
    f = np.zeros(D)
    f[sv] = h * a * ps.gamma * Pi.T @ Cyx_row
    Q = np.zeros((D, D))
    Q[sv, sv] = 2 * h * np.eye(r)
    for _ in range(T_S):
        mu = F @ mu + f
        S = F @ S @ F.T + Q
    return mu, S, (sw, su, sv)


def gaussian_kl(m0, S0, m1, S1):
    """KL(N(m0, S0) || N(m1, S1)), written out directly."""
    k = len(m0)
    S1inv = np.linalg.inv(S1)
    diff = m1 - m0
    return 0.5 * (np.trace(S1inv @ S0) - k + diff @ S1inv @ diff
                  + np.linalg.slogdet(S1)[1] - np.linalg.slogdet(S0)[1])


def z_from_p(p):
    """One-sided z of a p-value (large = evidence against the null)."""
    return float(sps.norm.isf(np.clip(p, 1e-300, 1.0)))


# SPEC §11: a population split over devices, chunks or processes draws the same numbers,
# but XLA may pick other kernels for other batch shapes, so states agree to the engine's
# rounding (growing slowly along the run) and float64 estimates to about 1e-10 relative.
LAYOUT_RTOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}
ESTIMATE_RTOL_F64 = 1e-10


def layout_difference(got, want) -> float:
    """Largest absolute difference of two state arrays, relative to the states' scale."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    if got.size == 0:
        return 0.0
    scale = max(1.0, float(np.max(np.abs(want))))
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) / scale


def assert_layout_close(got, want, what: str = "", engine_dtype: str = "float32") -> float:
    """States of another layout agree with the reference to the SPEC §11 tolerance of the
    precision the engine computed them in (Girsanov sums are stored as float64 but
    accumulated in the engine's dtype)."""
    diff = layout_difference(got, want)
    tol = LAYOUT_RTOL[np.dtype(engine_dtype)]
    assert diff <= tol, f"{what}: relative difference {diff:.3g} > {tol:g}"
    return diff


def assert_never_flagged(run, margin: float = 1e-4) -> None:
    """No chain of a healthy run was ever flagged diverged (the flags are sticky), and
    the final states sit far inside the escape region: prior-normalised squared norm
    ``R = ||w||^2 / s0^2`` below ``margin`` times the documented limit
    ``1e8 * D * max(1, (s_init/s0)^2, gamma s0^2)`` (kdsim.langevin), computed here."""
    pops, nm = run.populations, run.resolved.numeric
    assert not pops.diverged_T.any() and not pops.diverged_S.any()
    assert not pops.diverged_scratch.any()
    student = pops.student_sub if pops.student_sub is not None else pops.student
    for params, p in ((pops.teacher, nm.teacher), (student, nm.student)):
        leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(params)]
        E, P = leaves[0].shape[:2]
        D = sum(int(np.prod(x.shape[2:])) for x in leaves)
        R = sum((x.reshape(E, P, -1) ** 2).sum(-1) for x in leaves) / p.prior_scale**2
        limit = 1e8 * D * max(1.0, (p.init_scale / p.prior_scale) ** 2, p.gamma * p.prior_scale**2)
        assert R.max() < margin * limit, (R.max(), limit)
