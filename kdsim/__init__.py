"""kdsim: JAX Monte Carlo simulator for the generalization theory of knowledge distillation.

Quick start::

    import kdsim
    res = kdsim.simulate({"task": {"n": 64}, "student": {"alpha": 0.3}})
    res.summary          # dataset-averaged quantities with CIs
    res.per_dataset      # one row per dataset
    res.plot("overview.png")
"""

from .config import (
    ConfigError,
    EstimatorsConfig,
    LangevinConfig,
    ModelConfig,
    SimConfig,
    StudentConfig,
    TaskConfig,
    TeacherConfig,
    load_config,
)
from .io import ResultFileError, load_result
from .memory import MemoryBudgetError
from .memory import estimate as memory_estimate
from .result import Result
from .simulate import DivergenceError, run_populations, simulate
from .sweep import SweepError, load_sweep, sweep

__all__ = [
    "ConfigError",
    "DivergenceError",
    "EstimatorsConfig",
    "LangevinConfig",
    "MemoryBudgetError",
    "ModelConfig",
    "Result",
    "ResultFileError",
    "SimConfig",
    "SweepError",
    "StudentConfig",
    "TaskConfig",
    "TeacherConfig",
    "load_config",
    "load_result",
    "load_sweep",
    "memory_estimate",
    "run_populations",
    "simulate",
    "sweep",
]
