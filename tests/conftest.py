"""Test-suite settings.

- Silent broadcasting is an error (as in equinox's suite).
- One persistent XLA compilation cache for the whole run: the suite is compile-bound, and
  the same programs are compiled by both pytest workers and by every subprocess (the CLI,
  the killed-and-resumed sweeps, the two-process and four-device runs, the notebook). The
  cache is keyed by the program, the jax version and the flags, so a stale entry is never
  used; ``KDSIM_TEST_JAX_CACHE=""`` turns it off.
"""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CI", "1")  # no progress bars in test logs

_CACHE = os.environ.get("KDSIM_TEST_JAX_CACHE", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "jax-compilation-cache"))
if _CACHE:
    # environment variables, not jax.config, so that subprocesses share the cache
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

import kdsim  # noqa: E402

from helpers import SMALL_LINEAR  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def small_result():
    """The simulate() of ``helpers.SMALL_LINEAR``, shared by the simulate, io and plot tests
    (one run per pytest worker)."""
    return kdsim.simulate(SMALL_LINEAR)
