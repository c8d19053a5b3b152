"""Conditional-mutual-information (CMI) bounds from the supersample design (SPEC §10).

Pure array functions (call them under ``jax.enable_x64(True)``: MIs and bounds are
float64). Axes: ``S`` supersamples, ``M`` masks per supersample, ``P`` particles per
mask, ``n`` pairs per supersample. For pair i of supersample s, the ``M x P`` runs give
``M x P`` samples of ``(X_i, U_i)``; the *plug-in* MI is the MI of their empirical joint
law (weighted: a diverged particle has weight 0), so data processing holds exactly on
the same samples: ``I(Delta_i; U_i) <= I(L_i; U_i) <= I(F_i; U_i)`` whenever the loss
pair ``L_i`` is a function of the prediction pair ``F_i`` and ``Delta_i = L_i1 - L_i0``.

Bounds on the expected gap ``E gen = E[L_mu(W) - Lhat(W)]`` of a loss in ``[0, B]``; with
``G_i = (-1)^{U_i} Delta_i`` (held-out minus training loss of pair i),
``E gen = (1/n) sum_i E G_i``. Each comes from the Donsker--Varadhan inequality applied,
for each supersample ``z`` and pair ``i``, to the joint law of ``(X_i, U_i)`` against
the product of its marginals, in which ``U_i`` is a fair bit independent of ``X_i``:

- square-root forms (B-bounded G_i is B-sub-Gaussian under the product law):
  ``E gen <= (B/n) sum_i E_z sqrt(2 I^z(X_i; U_i))`` with ``X_i`` = the pair of predicted
  labels (f-CMI, Harutyunyan, Achille, Paolini, Majumder, Ravichandran, Soatto &
  Galstyan, "Information-theoretic generalization bounds for black-box learning
  algorithms", NeurIPS 2021; constant checked against the authors' code,
  ``sqrt(2 * mi)`` per example), the loss pair (e-CMI, Hellström & Durisi,
  "Generalization bounds via information density and conditional information
  density", IEEE JSAIT 2020, and NeurIPS 2022 "A new family of generalization bounds
  using samplewise evaluated CMI"), the loss difference (ld-CMI, Wang & Mao,
  "Tighter information-theoretic generalization bounds from supersamples", ICML 2023);
  each derived again here (the theorem texts were not available to check line by line)
- binary-KL form of the e-CMI (Hellström & Durisi 2022): DV with ``f = lam L_train``
  and ``E_U' e^{lam L_{U'}} <= 1 - m + m e^lam`` (``m`` the pair's mean loss / B, by
  convexity) gives, after the sup over lam and joint convexity over ``(z, i)``,
  ``d(Lhat / B || (Lhat + L_mu) / 2B) <= (1/n) sum_i E_z I^z(L_i; U_i)``, inverted for
  ``L_mu``;
- binary-KL form of the ld-CMI (losses on two levels, ``bins = 1``: the 0-1 loss, or a
  clipped loss rounded onto ``{0, B}``; ``Delta_i / B in {-1, 0, 1}``): with
  ``q = P(Delta_i != 0 | z)`` the law of ``G_i`` is ``(a, 1 - q, q - a)`` on
  ``(1, 0, -1)`` against ``(q/2, 1 - q, q/2)`` under the product law, whose KL is
  ``q d(a/q || 1/2) <= I^z(Delta_i; U_i)``, so ``E[G_i | z] <= q (2 x* - 1)`` with
  ``x* = sup{x : d(x || 1/2) <= I/q}`` (``~ sqrt(2 q I)``: fast when few pairs disagree;
  in the spirit of Wang & Mao's ld bounds, derived here);
- fast-rate form of the ld-CMI: DV with ``f = lam G_i`` and the EXACT product-law CGF
  ``log E[cosh(lam Delta_i / B) | z]`` (``U'`` is a fair bit independent of Delta):
  ``E gen <= B min_lam [ (1/n) sum_i E_z (I^z(Delta_i; U_i) + log E[cosh(lam Delta_i/B)|z]) ] / lam``,
  linear in the MI where the loss differences are rare (in the spirit of Wang & Mao's
  fast-rate bounds; derived here with the exact symmetric CGF, not their constants);
- the interpolating identity (0-1 loss, training error 0 on every run; Wang & Mao 2023,
  Haghifam et al. 2022): ``Delta_i`` then reveals ``U_i`` exactly when it is non-zero, so
  ``I(Delta_i; U_i) = P(held-out error) log 2`` (unconditional MI) and
  ``E gen = E L_mu = (1/n) sum_i I(Delta_i; U_i) / log 2``.

Losses on ``[0, B]`` that are not already on a grid (clipped squared losses) are put on
the grid ``{0, B/K, ..., B}`` (K = ``bins``) by *stochastic rounding* with uniforms
independent of everything else: ``E[q(l) | l] = l``, so the gap of the rounded loss has
exactly the expectation of the true one, and ``U -> L -> q(L)`` is a Markov chain, so
every bound above computed on ``q(L)`` is a valid bound on the true clipped loss (the
rounding loses information, it never adds any). Fewer bins: less plug-in bias, less
information kept.

Masks come in complementary pairs (:func:`kdsim.tasks.supersample.draw_masks`), so in
every pair's samples ``U_i`` is exactly a fair bit: the product law above IS the product
of the empirical marginals, and every inequality holds exactly for the empirical law. A
plug-in bound is then never below the held-out gap ``mean G_i`` of the same samples (a
test checks this); it can fall below the true ``E gen`` only by that estimate's own
sampling error, which the rows' ``valid`` flag allows for (3 standard errors).

Plug-in MI is biased (upwards for independent variables: about ``(K_x - 1)/(2N)`` nats
for ``K_x`` occupied values and N samples): :func:`cmi_bounds` also computes every MI
with each mask paired with the particles of ANOTHER mask of the same supersample (true
MI 0), which measures the bias on the same samples.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

LAM_GRID = 128                  # lam points of the fast-rate form (geometric)
LAM_SPAN = (1e-2, 1e2)          # in units of 1/B
BISECTION_STEPS = 60


# ---------------------------------------------------------------------------------------
# plug-in mutual information


def joint_counts(codes: jax.Array, u: jax.Array, weight: jax.Array, num_codes: int) -> jax.Array:
    """Weighted counts of ``(code, u)``: codes ``(N,)`` int in ``[0, num_codes)``, u ``(N,)``
    in ``{0, 1}``, weight ``(N,)`` -> ``(num_codes, 2)``."""
    return jax.ops.segment_sum(weight, codes * 2 + u, num_segments=num_codes * 2).reshape(
        num_codes, 2)


@jax.jit
def mutual_information(counts: jax.Array) -> jax.Array:
    """Plug-in MI (nats) of the empirical joint law with counts ``[..., K, 2]`` -> ``[...]``.

    .. math:: I = \\sum_{x,u} p(x,u) \\log \\frac{p(x,u)}{p(x) p(u)},\\qquad 0 \\log 0 = 0.
    """
    total = counts.sum(axis=(-2, -1), keepdims=True)
    p = counts / jnp.where(total > 0, total, 1.0)
    px = p.sum(axis=-1, keepdims=True)
    pu = p.sum(axis=-2, keepdims=True)
    safe = jnp.where(p > 0, p / jnp.where(px * pu > 0, px * pu, 1.0), 1.0)
    return jnp.maximum(jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=(-2, -1)), 0.0)


@partial(jax.jit, static_argnames=("num_codes",))
def plugin_mi(codes: jax.Array, u: jax.Array, num_codes: int, weight: jax.Array | None = None) -> jax.Array:
    """Plug-in MI of samples ``codes (N,)`` (ints in ``[0, num_codes)``) and ``u (N,)``
    (bits), optionally weighted."""
    w = jnp.ones(codes.shape, jnp.float64) if weight is None else weight
    return mutual_information(joint_counts(codes, u, w, num_codes))


# ---------------------------------------------------------------------------------------
# binary KL


def binary_kl(a: jax.Array, p: jax.Array) -> jax.Array:
    """``d(a || p) = a log(a/p) + (1-a) log((1-a)/(1-p))`` (``0 log 0 = 0``), elementwise."""
    t1 = jnp.where(a > 0, a * jnp.log(jnp.where(a > 0, a, 1.0) / jnp.maximum(p, 1e-300)), 0.0)
    t0 = jnp.where(a < 1, (1 - a) * jnp.log(jnp.where(a < 1, 1 - a, 1.0)
                                            / jnp.maximum(1 - p, 1e-300)), 0.0)
    return t1 + t0


def _bisect_sup(lo: jax.Array, holds, steps: int) -> jax.Array:
    """``sup{x in [lo, 1] : holds(x)}`` for ``holds`` true on ``[lo, x*]`` and false
    after, by ``steps`` bisections; the upper end is returned, which keeps a bound valid."""

    def body(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    _, hi = jax.lax.fori_loop(0, steps, body, (lo, jnp.ones_like(lo)))
    return jnp.where(holds(jnp.ones_like(lo)), 1.0, hi)


@partial(jax.jit, static_argnames=("steps",))
def kl_inverse_upper(a: jax.Array, r: jax.Array, steps: int = BISECTION_STEPS) -> jax.Array:
    """``sup{p in [a, 1] : d(a || p) <= r}`` by bisection (``d(a||.)`` increases on [a, 1])."""
    a = jnp.clip(a, 0.0, 1.0)
    return _bisect_sup(a, lambda p: binary_kl(a, p) <= r, steps)


@partial(jax.jit, static_argnames=("steps",))
def kl_inverse_first(p: jax.Array, r: jax.Array, steps: int = BISECTION_STEPS) -> jax.Array:
    """``sup{x in [p, 1] : d(x || p) <= r}`` by bisection (``d(.||p)`` increases on [p, 1])."""
    p = jnp.clip(p, 0.0, 1.0)
    return _bisect_sup(p, lambda x: binary_kl(x, p) <= r, steps)


# ---------------------------------------------------------------------------------------
# codes of the three families


def round_losses(losses: jax.Array, uniforms: jax.Array, B, bins: int) -> jax.Array:
    """Stochastic rounding of losses in ``[0, B]`` onto ``{0, ..., bins}`` (units B/bins):
    ``floor(l bins / B + r)`` with r uniform on [0, 1), so ``E[q | l] = l bins / B``.
    Losses already on the grid (0-1 loss, ``bins = 1``) are unchanged."""
    x = jnp.clip(losses / B, 0.0, 1.0) * bins
    return jnp.clip(jnp.floor(x + uniforms), 0, bins).astype(jnp.int32)


def family_codes(q: jax.Array, bins: int, labels: jax.Array | None = None,
                 num_classes: int = 0) -> dict[str, tuple[jax.Array, int]]:
    """Integer codes and alphabet sizes of the three families on pairs ``[..., 2]``.

    ``q``: rounded loss pairs ``[..., 2]`` in ``{0..bins}``; ``labels``: predicted-label
    pairs ``[..., 2]`` (classification) or None. The loss-pair code is a function of the
    label-pair code (given the data) and the difference code of the loss-pair code, so
    plug-in MIs on the same samples obey data processing exactly.
    """
    out = {"e": (q[..., 0] * (bins + 1) + q[..., 1], (bins + 1) ** 2),
           "ld": (q[..., 1] - q[..., 0] + bins, 2 * bins + 1)}
    if labels is not None:
        out["f"] = (labels[..., 0] * num_classes + labels[..., 1], num_classes ** 2)
    return out


# ---------------------------------------------------------------------------------------
# the bounds


class CMIBounds(NamedTuple):
    """CMI bounds on ``E gen`` of one loss in ``[0, B]`` (scalars, float64; NaN where a
    form does not apply). ``*_se``: standard error over supersamples."""

    fcmi: jax.Array              # square-root f-CMI (NaN without labels)
    fcmi_se: jax.Array
    ecmi: jax.Array              # square-root e-CMI
    ecmi_se: jax.Array
    ldcmi: jax.Array             # square-root ld-CMI
    ldcmi_se: jax.Array
    ecmi_kl: jax.Array           # binary-KL e-CMI
    ldcmi_kl: jax.Array          # binary-KL ld-CMI (losses on two levels, bins = 1), else NaN
    ldcmi_fast: jax.Array        # fast-rate ld-CMI (exact symmetric CGF)
    ldcmi_interp: jax.Array      # interpolating identity (0-1 loss); NaN unless interpolating
    interpolating: jax.Array     # 1.0 if the training loss is 0 on every sample
    mi: jax.Array                # (3,) mean plug-in MI per pair: f, e, ld (nats)
    mi_null: jax.Array           # (3,) the same under mismatched masks (true MI 0): the bias
    null_bound: jax.Array        # (3,) square-root bounds under mismatched masks
    train_loss: jax.Array        # mean training loss (rounded; its expectation is exact)
    heldout_gap: jax.Array       # mean of G_i: an unbiased estimate of E gen if masks are fair
    heldout_gap_s: jax.Array     # (S,) per supersample
    samples: jax.Array           # mean number of (weighted) samples per pair: ~ M x P


@partial(jax.jit, static_argnames=("num_codes",))
def pair_counts(codes: jax.Array, U: jax.Array, weight: jax.Array, num_codes: int) -> jax.Array:
    """Per-pair joint counts of ``(code, U_i)`` over the ``M x P`` runs of a supersample.

    codes ``(S, M, P, n)`` ints in ``[0, num_codes)``, U ``(S, M, n)``, weight ``(S, M, P)``
    -> counts ``(S, n, num_codes, 2)``; :func:`mutual_information` of them is the plug-in
    ``I^z(X_i; U_i)`` of every supersample z and pair i.
    """
    S, M, P, n = codes.shape

    def one(c, u, w):          # one supersample
        c = jnp.moveaxis(c, -1, 0).reshape(n, M * P)
        u = jnp.broadcast_to(jnp.moveaxis(u, -1, 0)[:, :, None], (n, M, P)).reshape(n, M * P)
        w = jnp.broadcast_to(w.reshape(1, M * P), (n, M * P))
        return jax.vmap(lambda ci, ui, wi: joint_counts(ci, ui, wi, num_codes))(c, u, w)

    return jax.vmap(one)(codes, U, weight)


def _sqrt_form(mi, B):
    """``B mean_i sqrt(2 I)`` per supersample ``(S,)``, its mean and se over supersamples."""
    per_s = B * jnp.mean(jnp.sqrt(2.0 * mi), axis=-1)
    S = per_s.shape[0]
    se = jnp.std(per_s, ddof=1) / jnp.sqrt(S) if S > 1 else jnp.nan
    return jnp.mean(per_s), se


@partial(jax.jit, static_argnames=("bins", "num_classes"))
def cmi_bounds(U: jax.Array, weight: jax.Array, losses: jax.Array, uniforms: jax.Array,
               labels: jax.Array | None, B, *, bins: int, num_classes: int = 0) -> CMIBounds:
    """Every CMI bound of one supersample run, for one loss.

    Args:
      U: ``(S, M, n)`` masks in ``{0, 1}``.
      weight: ``(S, M, P)``: 1 for a surviving particle, 0 for a diverged one.
      losses: ``(S, M, P, n, 2)`` the loss of each particle on both points of each pair,
        in ``[0, B]`` (0-1 loss, or squared loss clipped at B).
      uniforms: ``(S, M, P, n, 2)`` uniforms on [0, 1) for the stochastic rounding
        (independent of everything else; unused when ``bins = 1`` and losses are 0/1).
      labels: ``(S, M, P, n, 2)`` predicted labels (classification: f-CMI), or None.
      B: the loss bound. bins: the rounding grid (1 for the 0-1 loss).
      num_classes: K (classification).
    Returns:
      :class:`CMIBounds`.
    """
    S, M, P, n, _ = losses.shape
    weight = weight.astype(jnp.float64)
    q = round_losses(losses, uniforms, B, bins)
    codes = family_codes(q, bins, labels, num_classes)
    # mask m is paired with the particles of mask m + 1 (independent of them): true MI 0
    U_null = jnp.roll(U, -1, axis=1)
    mi, mi_null, nb, sq = {}, {}, {}, {}
    counts = {}
    for fam, (c, K) in codes.items():
        counts[fam] = pair_counts(c, U, weight, K)                     # (S, n, K, 2)
        mi[fam] = mutual_information(counts[fam])                            # (S, n)
        mi_null[fam] = mutual_information(pair_counts(c, U_null, weight, K))
        sq[fam] = _sqrt_form(mi[fam], B)
        nb[fam] = _sqrt_form(mi_null[fam], B)[0]
    nan = jnp.asarray(jnp.nan, jnp.float64)
    f_val, f_se = sq.get("f", (nan, nan))

    # binary-KL e-CMI: d(Lhat || (Lhat + L_mu)/2) <= mean I_e
    ce = counts["e"]
    total = ce.sum(axis=(-2, -1))                                            # (S, n)
    grid = jnp.arange((bins + 1) ** 2)
    q0, q1 = grid // (bins + 1), grid % (bins + 1)
    train_units = (jnp.stack([q0, q1], axis=-1) / bins)[None, None]          # (1, 1, K, 2): loss/B
    train = jnp.sum(ce * train_units, axis=(-2, -1)) / jnp.maximum(total, 1e-300)   # (S, n)
    a = jnp.mean(train)
    p_star = kl_inverse_upper(a, jnp.mean(mi["e"]))
    ecmi_kl = B * 2.0 * (p_star - a)

    # difference law per pair: p(delta) on {-bins..bins} / bins
    cl = counts["ld"]
    p_delta = cl.sum(-1) / jnp.maximum(cl.sum(axis=(-2, -1))[..., None], 1e-300)   # (S, n, 2b+1)
    delta = (jnp.arange(2 * bins + 1) - bins) / bins

    # binary-KL ld-CMI (Delta in {-1, 0, 1}): E[G | z] <= q (2 x* - 1), d(x* || 1/2) = I / q
    qnz = 1.0 - p_delta[..., bins]
    x_star = kl_inverse_first(jnp.full_like(qnz, 0.5), mi["ld"] / jnp.maximum(qnz, 1e-300))
    ld_kl_pair = jnp.where(qnz > 0, qnz * (2.0 * x_star - 1.0), 0.0)
    ldcmi_kl = jnp.where(bins == 1, B * jnp.mean(ld_kl_pair), nan)

    # fast-rate ld-CMI: B min_lam mean(I + log E cosh(lam Delta)) / lam
    lam = jnp.geomspace(*LAM_SPAN, LAM_GRID)
    z = jnp.abs(lam[:, None] * delta[None, :])                               # (L, 2b+1)
    log_cosh = z + jnp.log1p(jnp.exp(-2.0 * z)) - jnp.log(2.0)
    logp = jnp.log(jnp.maximum(p_delta, 1e-300))
    cgf = jax.scipy.special.logsumexp(
        jnp.where(p_delta[None] > 0, logp[None] + log_cosh[:, None, None, :], -jnp.inf), axis=-1)
    ldcmi_fast = B * jnp.min((jnp.mean(mi["ld"]) + jnp.mean(cgf, axis=(1, 2))) / lam)

    # interpolating identity: the unconditional MI of (Delta, U), pooled over supersamples
    # and pairs (exchangeable), over log 2
    pooled = cl.sum(axis=(0, 1))
    interp = (jnp.sum(ce * train_units, axis=(0, 1, 2, 3)).sum() == 0).astype(jnp.float64)
    ld_interp = jnp.where((bins == 1) & (interp > 0), B * mutual_information(pooled) / jnp.log(2.0),
                          nan)

    # the held-out gap (-1)^U Delta, per supersample: an unbiased estimate of E gen
    sign = (1 - 2 * U).astype(jnp.float64)                                  # (S, M, n)
    G = sign[:, :, None, :] * (losses[..., 1] - losses[..., 0])              # (S, M, P, n)
    w = weight[..., None]
    heldout_s = jnp.sum(G * w, axis=(1, 2, 3)) / jnp.maximum(n * weight.sum(axis=(1, 2)), 1e-300)

    fams = ("f", "e", "ld")
    mean_or_nan = lambda d, f: jnp.mean(d[f]) if f in d else nan
    return CMIBounds(
        fcmi=f_val, fcmi_se=f_se, ecmi=sq["e"][0], ecmi_se=sq["e"][1], ldcmi=sq["ld"][0],
        ldcmi_se=sq["ld"][1], ecmi_kl=ecmi_kl, ldcmi_kl=ldcmi_kl, ldcmi_fast=ldcmi_fast,
        ldcmi_interp=ld_interp, interpolating=interp,
        mi=jnp.stack([mean_or_nan(mi, f) for f in fams]),
        mi_null=jnp.stack([mean_or_nan(mi_null, f) for f in fams]),
        null_bound=jnp.stack([nb.get(f, nan) for f in fams]),
        train_loss=B * a, heldout_gap=jnp.mean(heldout_s), heldout_gap_s=heldout_s,
        samples=jnp.mean(total))
