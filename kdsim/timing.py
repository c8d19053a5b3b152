"""Wall-clock seconds per evaluation stage (``Result.meta["timings"]``).

A stage nested in another is counted once: its seconds go to the inner stage only, so
the stages add up to the time measured.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from threadpoolctl import threadpool_limits


class StageTimer:
    """``with timer("bounds"): ...`` adds the block's exclusive seconds to ``seconds["bounds"]``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            inner = self._inner.pop()
            dt = time.perf_counter() - t0
            self.seconds[stage] = self.seconds.get(stage, 0.0) + dt - inner
            if self._inner:
                self._inner[-1] += dt


def timer_or_null(timer: StageTimer | None) -> StageTimer:
    """The given timer, or a throwaway one (callers need not check for None)."""
    return timer if timer is not None else StageTimer()


@contextmanager
def single_threaded_blas():
    """NumPy's BLAS / LAPACK on one thread for the block.

    The evaluation's linear algebra is many small batched problems (``(E, d, d)`` eigh,
    solves, einsums): threads buy nothing there, and on a busy machine the BLAS thread
    pool's hand-offs made a batched 32 x 32 eigh 25x slower (83 ms against 3 ms).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield
