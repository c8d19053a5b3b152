"""Progress reporting on the host (tqdm), never from inside compiled code.

Long runs advance their chains as a host loop over jitted scan segments
(:data:`SEGMENT_STEPS` steps each), and the loop reports here between segments: no
callback runs inside compiled code (those break under sharding and vmap and cost a host
round-trip per step). Progress is off when the environment variable ``CI`` is set or
stderr is not a terminal, unless asked for explicitly.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

SEGMENT_STEPS = 250


def enabled(requested: bool | None) -> bool:
    if requested is not None:
        return bool(requested)
    if os.environ.get("CI"):
        return False
    return sys.stderr.isatty()


def segments(total: int, length: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, num_steps)`` segments covering ``0 .. total - 1``.

    Segments have equal length where possible (about ``length``, default
    :data:`SEGMENT_STEPS`), so a run compiles one segment program (two when ``total``
    has no divisor close to ``length``).
    """
    length = length or SEGMENT_STEPS
    if total <= 0:
        return
    count = -(-total // length)
    size = -(-total // count)
    start = 0
    while start < total:
        step = min(size, total - start)
        yield start, step
        start += step


class Progress:
    """A step counter over the phases of one run (or points of a sweep)."""

    def __init__(self, total: int, desc: str, unit: str = "step", enabled: bool = False):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
                            dynamic_ncols=True)

    def update(self, n: int, postfix: str | None = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullProgress(Progress):
    def __init__(self) -> None:
        self.bar = None
