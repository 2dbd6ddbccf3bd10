"""Optimiser and learning-rate schedule from ``config.optimizer``."""

from __future__ import annotations

import optax


def learning_rate_schedule(config):
  """Linear warm-up to ``learning_rate``, cosine decay to
  ``learning_rate * end_factor`` at ``config.total_steps``."""
  opt = config.optimizer
  decay_steps = max(config.total_steps, opt.warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate,
      warmup_steps=opt.warmup_steps, decay_steps=decay_steps,
      end_value=opt.learning_rate * opt.end_factor)


def make_optimizer(config):
  """Gradient clipping then AdamW; returns ``(optax transform, schedule)``."""
  opt = config.optimizer
  if opt.name != "adamw":
    raise ValueError(f"unknown optimizer {opt.name!r}; known: adamw")
  schedule = learning_rate_schedule(config)
  tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay))
  return tx, schedule
