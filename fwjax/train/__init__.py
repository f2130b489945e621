"""Training: typed configs, a pure jitted train step sharded over a device mesh, Orbax
checkpoints with exact resume, metrics, and the loop behind ``fwjax train``."""

from fwjax.train.checkpoint import Checkpointer
from fwjax.train.config import (
    CheckpointConfig,
    DistributedConfig,
    EarlyStoppingConfig,
    LMTaskConfig,
    MeshConfig,
    NonFinitePolicy,
    OptimizerConfig,
    OptimizerKind,
    RecallTaskConfig,
    RetrievalTaskConfig,
    ScheduleKind,
    TaskKind,
    TrainConfig,
)
from fwjax.train.loop import NonFiniteLossError, Run, initialize_distributed, train, train_run
from fwjax.train.optim import learning_rate_schedule, make_optimizer
from fwjax.train.step import TrainState, make_eval_step, make_train_step

__all__ = [
    "CheckpointConfig",
    "Checkpointer",
    "DistributedConfig",
    "EarlyStoppingConfig",
    "LMTaskConfig",
    "MeshConfig",
    "NonFiniteLossError",
    "NonFinitePolicy",
    "OptimizerConfig",
    "OptimizerKind",
    "RecallTaskConfig",
    "RetrievalTaskConfig",
    "Run",
    "ScheduleKind",
    "TaskKind",
    "TrainConfig",
    "TrainState",
    "initialize_distributed",
    "learning_rate_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "train",
    "train_run",
]
