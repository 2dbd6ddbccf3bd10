"""Training curves of a run: loss and accuracy against steps."""

from __future__ import annotations

from typing import List

from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save

# Accuracy-like metrics drawn in the right panel, in order of preference.
_SCORES = ("accuracy", "exact_match", "token_accuracy")


def draw_curves(history: List[dict], path: str) -> Pictures:
  """Loss and the accuracy metrics (``accuracy``; ``exact_match`` and
  ``token_accuracy`` for seq2seq) against steps, train and eval.

  Args:
    history: rows of ``metrics.jsonl``: ``{"split", "step", metric: value}``.
  """
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
  for split, style in (("train", "-"), ("eval", "o-")):
    rows = [r for r in history if r["split"] == split]
    if not rows:
      continue
    steps = [r["step"] for r in rows]
    if "loss" in rows[0]:
      axes[0].plot(steps, [r["loss"] for r in rows], style, label=split, markersize=3)
    for metric in _SCORES:
      if metric in rows[0]:
        axes[1].plot(steps, [r[metric] for r in rows], style, markersize=3,
                     label=f"{split} {metric}")
  for ax, title in zip(axes, ("loss", "accuracy")):
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return save(fig, path)


__all__ = ["draw_curves"]
