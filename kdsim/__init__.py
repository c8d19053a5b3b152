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
from .io import ResultFileError
from .memory import MemoryBudgetError
from .memory import estimate as memory_estimate
from .models import Model, ModelError, from_linen, from_nnx
from .result import Result, load_result
from .simulate import DivergenceError, run_populations, simulate
from .sweep import SweepError, load_sweep, ray_executor, sweep
from .tasks.sources import DataError

__all__ = [
    "ConfigError",
    "DataError",
    "DivergenceError",
    "EstimatorsConfig",
    "LangevinConfig",
    "MemoryBudgetError",
    "Model",
    "ModelConfig",
    "ModelError",
    "Result",
    "ResultFileError",
    "SimConfig",
    "SweepError",
    "StudentConfig",
    "TaskConfig",
    "TeacherConfig",
    "from_linen",
    "from_nnx",
    "load_config",
    "load_result",
    "load_sweep",
    "memory_estimate",
    "ray_executor",
    "run_populations",
    "simulate",
    "sweep",
]
