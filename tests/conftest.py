"""Test-suite settings: turn silent broadcasting into errors (as equinox's suite does)."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CI", "1")  # no progress bars in test logs

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
