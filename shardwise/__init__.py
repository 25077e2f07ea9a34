"""shardwise: ZeRO, heterogeneous memory and every kind of parallelism in one design."""

from shardwise.config import Config
from shardwise.distributed.dims import ParallelDims
from shardwise.engine import Engine, initialize
from shardwise.models.spec import ModelSpec
from shardwise.run_plan import RunPlan, resolve

__version__ = "0.1.0"

__all__ = [
    "Config",
    "Engine",
    "ModelSpec",
    "ParallelDims",
    "RunPlan",
    "initialize",
    "resolve",
    "__version__",
]
