"""Losses and metrics per task, chosen by ``config.task``.

A task knows how to score model outputs against a batch; the training loop is
the same for all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Task:
  """``train_loss(outputs, batch, config) -> (loss, {name: scalar})`` and
  ``eval_sums(outputs, batch) -> {name: weighted sum}``; eval metrics are the
  sums divided by the summed ``weight``."""
  train_loss: Callable
  eval_sums: Callable


def _classification_train_loss(logits, batch, config):
  labels = batch["label"]
  targets = optax.smooth_labels(
      jax_one_hot(labels, logits.shape[-1]), config.label_smoothing)
  loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
  accuracy = (jnp.argmax(logits, -1) == labels).mean()
  return loss, {"loss": loss, "accuracy": accuracy}


def _classification_eval_sums(logits, batch):
  labels, weight = batch["label"], batch["weight"]
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"loss": (loss * weight).sum(), "accuracy": (correct * weight).sum()}


def jax_one_hot(labels, num_classes):
  return (labels[..., None] == jnp.arange(num_classes)).astype(jnp.float32)


TASKS: Dict[str, Task] = {
    "classification": Task(_classification_train_loss, _classification_eval_sums),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
  return TASKS[name]
