"""Task and distillation losses, for any model (SPEC §2, §6).

Per-example losses take ONE prediction ``f`` of shape ``(out,)``; risks are means over
a batch of predictions ``(m, out)``. Regression uses the squared loss, classification the
cross-entropy (and the bounded 0-1 loss for evaluation); the distillation loss is
``0.5 ||yhat - f||^2`` against soft labels, or ``tau^2 KL(p_T || softmax(f / tau))``
against the tempered teacher probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def squared_loss(f: jax.Array, y: jax.Array) -> jax.Array:
    return 0.5 * jnp.sum((y - f) ** 2)


def cross_entropy(f: jax.Array, y: jax.Array) -> jax.Array:
    return -jax.nn.log_softmax(f)[y]


def zero_one(f: jax.Array, y: jax.Array) -> jax.Array:
    return (jnp.argmax(f) != y).astype(f.dtype)


def kd_regression(f: jax.Array, soft: jax.Array) -> jax.Array:
    """``0.5 ||yhat - f||^2`` against the soft label ``yhat = f_T(x) + nu_T e``."""
    return 0.5 * jnp.sum((soft - f) ** 2)


def kd_classification(f: jax.Array, p_teacher: jax.Array, tau) -> jax.Array:
    """``tau^2 KL(p_T || softmax(f / tau))`` with ``p_T = softmax(f_T / tau)`` given."""
    logq = jax.nn.log_softmax(f / tau)
    logp = jnp.log(jnp.clip(p_teacher, 1e-30, 1.0))
    return tau**2 * jnp.sum(p_teacher * (logp - logq))


def task_loss(classification: bool):
    """The per-example task loss: cross-entropy or squared."""
    return cross_entropy if classification else squared_loss


def task_risk(f: jax.Array, Y: jax.Array, classification: bool) -> jax.Array:
    """Mean task loss of predictions ``(m, out)`` against ``Y`` ``(m, k)`` or labels ``(m,)``."""
    return jnp.mean(jax.vmap(task_loss(classification))(f, Y))


def kd_risk(f: jax.Array, target: jax.Array, tau, classification: bool) -> jax.Array:
    """Mean distillation loss against per-example targets ``(m, out)``."""
    if classification:
        return jnp.mean(jax.vmap(kd_classification, in_axes=(0, 0, None))(f, target, tau))
    return jnp.mean(jax.vmap(kd_regression)(f, target))


def soft_targets(f_T: jax.Array, tau, classification: bool) -> jax.Array:
    """What a student distils from its partner's predictions (before channel noise)."""
    return jax.nn.softmax(f_T / tau, axis=-1) if classification else f_T
