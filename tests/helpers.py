"""Shared test helpers: small configs and an independent NumPy oracle."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as sps

import kdsim
from kdsim import SimConfig, models, populations, streams
from kdsim.config import resolve
from kdsim.streams import root_key
from kdsim.tasks import linear_gaussian as lg

# A small linear run (3 datasets x 64 particles) shared by the simulate, io and plot tests.
SMALL_LINEAR = {"task": {"d": 3, "k": 2, "n": 16}, "teacher": {"num_steps": 40},
                "num_datasets": 3, "num_particles": 64}

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


class LinearLaws(NamedTuple):
    """Finite-time laws of the linear task, per dataset (leading axis E), in parameter space."""

    M_T: np.ndarray       # (E, k, d)
    Sigma_T: np.ndarray   # (E, d, d) row covariance
    M_S: np.ndarray       # (E, k, d)
    Sigma_S: np.ndarray   # (E, d, d)
    C: np.ndarray         # (E, d, d) Cov(student row, teacher row)


def linear_laws_np(cfg: SimConfig, data: lg.LinearData | None = None, **numeric_over) -> LinearLaws:
    """The laws of SPEC §3 by iterating ``z <- F z + f + N(0, Q)`` literally, all datasets
    and rows at once (independent of kdsim.closed_form); ``numeric_over`` replaces fields of
    the resolved numbers (e.g. ``alpha=1.0, teacher_noise=0.0`` for the scratch student)."""
    res = resolve(cfg)
    st, nm = res.static, res.numeric._replace(**numeric_over)
    data = data_for(cfg) if data is None else data
    X, Y, Pi = data.X, data.Y, data.Pi
    E, n, d = X.shape
    r = Pi.shape[-1]
    Cxx = np.einsum("eni,enj->eij", X, X) / n
    Cyx = np.einsum("enk,end->ekd", Y, X) / n
    pt, ps, a, nu_T = nm.teacher, nm.student, nm.alpha, nm.teacher_noise
    D = d + 2 * r
    sw, su, sv = slice(0, d), slice(d, d + r), slice(d + r, D)
    eye = lambda m: np.broadcast_to(np.eye(m), (E, m, m))
    PCP = np.einsum("edr,edf,efs->ers", Pi, Cxx, Pi)
    mu = np.zeros((E, Y.shape[-1], D))
    S = np.zeros((E, D, D))
    S[:, sw, sw] = pt.init_scale**2 * eye(d)
    S[:, su, su] = ps.gamma**2 / n * PCP
    S[:, sv, sv] = ps.init_scale**2 * eye(r)
    F = np.broadcast_to(np.eye(D), (E, D, D)).copy()
    F[:, sw, sw] = eye(d) - pt.step_size * (pt.gamma * Cxx + eye(d) / pt.prior_scale**2)
    f = np.zeros_like(mu)
    f[..., sw] = pt.step_size * pt.gamma * Cyx
    Q = np.zeros((D, D))
    Q[sw, sw] = 2 * pt.step_size * np.eye(d)
    for _ in range(st.teacher_steps):
        mu = np.einsum("eij,ekj->eki", F, mu) + f
        S = F @ S @ np.swapaxes(F, 1, 2) + Q
    h = ps.step_size
    F = np.broadcast_to(np.eye(D), (E, D, D)).copy()
    F[:, sv, sv] = eye(r) - h * (ps.gamma * PCP + eye(r) / ps.prior_scale**2)
    F[:, sv, sw] = h * (1 - a) * ps.gamma * np.einsum("edr,edf->erf", Pi, Cxx)
    F[:, sv, su] = h * (1 - a) * nu_T * eye(r)
    f = np.zeros_like(mu)
    f[..., sv] = h * a * ps.gamma * np.einsum("edr,ekd->ekr", Pi, Cyx)
    Q = np.zeros((D, D))
    Q[sv, sv] = 2 * h * np.eye(r)
    for _ in range(st.student_steps):
        mu = np.einsum("eij,ekj->eki", F, mu) + f
        S = F @ S @ np.swapaxes(F, 1, 2) + Q
    PiT = np.swapaxes(Pi, 1, 2)
    return LinearLaws(mu[..., sw], S[:, sw, sw], mu[..., sv] @ PiT, Pi @ S[:, sv, sv] @ PiT,
                      Pi @ S[:, sv, sw])


def expected_risks_np(M, Sigma, data: lg.LinearData):
    """``(E L_mu, E Lhat_D)`` for rows ~ N(M, Sigma), per dataset (SPEC §3)."""
    X, Y = data.X, data.Y
    n, k = X.shape[1], Y.shape[-1]
    Sx = np.diag(data.sx)
    B = M - data.W_star
    pop = 0.5 * (np.einsum("ekd,df,ekf->e", B, Sx, B) + k * np.einsum("edf,fd->e", Sigma, Sx)
                 + k * data.noise**2)
    R = np.einsum("ekd,end->enk", M, X) - Y
    Cxx = np.einsum("eni,enj->eij", X, X) / n
    train = 0.5 * (np.sum(R**2, axis=(1, 2)) / n + k * np.einsum("eij,eji->e", Sigma, Cxx))
    return pop, train


def linear_truths_np(cfg: SimConfig) -> dict[str, np.ndarray]:
    """Every closed-form truth a linear run reports, computed here: ``(E,)`` arrays."""
    data = data_for(cfg)
    laws = linear_laws_np(cfg, data)
    scratch = linear_laws_np(cfg, data, alpha=1.0, teacher_noise=0.0)
    out = {}
    for name, M, Sig in (("T", laws.M_T, laws.Sigma_T), ("S", laws.M_S, laws.Sigma_S),
                         ("S_scratch", scratch.M_S, scratch.Sigma_S)):
        pop, train = expected_risks_np(M, Sig, data)
        out[f"gen_{name}"], out[f"test_loss_{name}"] = pop - train, pop
    E = data.X.shape[0]
    out["kl"] = np.array([sum(gaussian_kl(laws.M_S[e, j], laws.Sigma_S[e], laws.M_T[e, j],
                                          laws.Sigma_T[e]) for j in range(laws.M_S.shape[1]))
                          for e in range(E)]) if resolve(cfg).static.full_student else np.full(E, np.inf)
    return out


def z_spread_ok(z, familywise: float = 1e-3) -> tuple[bool, float, float]:
    """Are standard errors NOT inflated? ``sum z^2`` over m cells is ~ chi2(m) when the
    standard errors are right; inflating them by a factor c shrinks it by c^2. Returns
    ``(sum z^2 >= the chi2(m) quantile at familywise, the statistic, the limit)``."""
    z = np.asarray(z, np.float64).ravel()
    stat, limit = float(np.sum(z**2)), float(sps.chi2.ppf(familywise, z.size))
    return stat >= limit, stat, limit


def builtin_model(width=6, depth=2, out=3, d=5, kind="mlp"):
    """A built-in model and its prepared form (``models.prepare``), float32."""
    cfg = kdsim.ModelConfig(kind=kind, width=width, depth=depth, activation="tanh")
    model = models.builtin(cfg, out, (d,))
    return model, models.prepare(model, role="teacher_model", input_shape=(d,), out=out,
                                 dtype="float32")


def initial_draws(prepared, P, init_scale=0.7, stream="teacher_init"):
    """Initial particles of one dataset, as the engine draws them (leaves ``(P, ...)``)."""
    state, _ = populations._model_init(
        streams.root_key(0), jnp.arange(1, dtype=jnp.uint32), jnp.arange(P, dtype=jnp.uint32),
        jnp.float32(init_scale), prepared.scale_tree(jnp.float32), structure=prepared.structure,
        init_stream=stream, noise_stream="teacher_noise", dtype="float32")
    return jax.tree_util.tree_map(lambda x: x[0], state.position)
