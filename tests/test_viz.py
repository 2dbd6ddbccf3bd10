"""Rollout math against a hand-computed example, and the drawing helpers."""

import numpy as np
import pytest

from attention_lab.viz import report
from attention_lab.viz import rollout


def test_rollout_by_hand():
  # Two layers, one head, two tokens.
  a1 = np.array([[[[0.5, 0.5], [0.0, 1.0]]]])
  a2 = np.array([[[[1.0, 0.0], [0.25, 0.75]]]])
  # Add identity, renormalise rows:
  #   r1 = [[0.75, 0.25], [0, 1]],  r2 = [[1, 0], [0.125, 0.875]]
  # rollout = r2 @ r1 = [[0.75, 0.25], [0.09375, 0.90625]]
  got = rollout.attention_rollout([a1, a2])
  np.testing.assert_allclose(got[0], [[0.75, 0.25], [0.09375, 0.90625]])
  np.testing.assert_allclose(got.sum(-1), 1.0)


def test_rollout_averages_heads_and_rejects_bad_shapes():
  heads = np.stack([np.eye(3), np.full((3, 3), 1 / 3)])[None]      # [1, 2, 3, 3]
  got = rollout.attention_rollout([heads], residual=0.0)
  np.testing.assert_allclose(got[0], (np.eye(3) + 1 / 3) / 2)
  with pytest.raises(ValueError, match="tokens, tokens"):
    rollout.attention_rollout([np.ones((1, 2, 3, 4))])
  with pytest.raises(ValueError, match="at least one layer"):
    rollout.attention_rollout([])


def test_grid_and_upsample():
  grid = rollout.tokens_to_grid(np.arange(12.0), 30, 40)
  assert grid.shape == (3, 4)
  up = rollout.upsample(grid, 30, 40)
  assert up.shape == (30, 40) and up[0, 0] == 0 and up[29, 39] == 11
  with pytest.raises(ValueError, match="do not tile"):
    rollout.tokens_to_grid(np.arange(7.0), 28, 28)


def test_collect_attention_orders_layers_numerically():
  tree = {"encoder": {f"block_{i}": {"attention": {"attention_weights": (np.full((1, 1, 2, 2), i),)}}
                      for i in (10, 2, 1)}}
  layers = report.collect_attention(tree)
  assert [int(w[0, 0, 0, 0]) for w in layers] == [1, 2, 10]


def test_unknown_viz_kind(tmp_path):
  with pytest.raises(ValueError, match="unknown viz kind 'sound'"):
    report.draw_examples("sound", str(tmp_path))
