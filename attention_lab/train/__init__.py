"""Training: one loop for every task, orbax checkpoints, metrics."""

from attention_lab.train.checkpoint import CheckpointError
from attention_lab.train.checkpoint import CheckpointMismatch
from attention_lab.train.loop import NonFiniteError
from attention_lab.train.loop import WorkdirError
from attention_lab.train.loop import evaluate_checkpoint
from attention_lab.train.loop import predict_checkpoint
from attention_lab.train.loop import train_and_evaluate
from attention_lab.train.loop import visualize_checkpoint
from attention_lab.train.validation import ConfigError
from attention_lab.train.validation import validate as validate_config

__all__ = ["CheckpointError", "CheckpointMismatch", "ConfigError", "NonFiniteError",
           "WorkdirError", "evaluate_checkpoint", "predict_checkpoint", "train_and_evaluate",
           "validate_config", "visualize_checkpoint"]
