"""Convolutional attention pictures (SE, ECA, CBAM): the spatial maps over the
input and the channel gates of every block.

Shape contract (``layers.conv_attention`` sows them): ``spatial_map``
``[batch, height, width]`` per CBAM block, ``channel_weights``
``[batch, channels]`` per block with a channel gate.
"""

from __future__ import annotations

import os

import numpy as np

from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save
from attention_lab.viz.panels import draw_input_image
from attention_lab.viz.panels import show_image
from attention_lab.viz.sown import collect_sown


def _short(module: str) -> str:
  """``stage1_block0/attention`` -> ``stage1_block0``."""
  return module.rsplit("/attention", 1)[0]


def _check_rank(name: str, sown, ndim: int, layout: str) -> None:
  for module, array in sown:
    if array.ndim != ndim:
      raise ValueError(f"{name} sown by {module} has shape {array.shape}; expected {layout}")


def draw_spatial_maps(image, maps, path: str, title: str) -> Pictures:
  """The input ``[height, width, channels]`` and each block's spatial
  attention map (CBAM), ``[(module, [h, w])]``, over it.

  Each map is stretched to its own range (printed in its title): the gates of
  a block often differ by a few tenths, which a fixed 0-1 scale would hide.
  """
  height, width = image.shape[:2]
  fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.3 * (len(maps) + 1), 2.6),
                           dpi=100, squeeze=False)
  show_image(axes[0, 0], image)
  axes[0, 0].set_title("input", fontsize=8)
  for ax, (module, heat) in zip(axes[0, 1:], maps):
    show_image(ax, image)
    ax.imshow(heat, cmap="inferno", alpha=0.6, interpolation="bilinear",
              extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    ax.set_title(f"{_short(module)} {heat.shape[0]}x{heat.shape[1]}\n"
                 f"gate {heat.min():.2f}-{heat.max():.2f}", fontsize=7)
  fig.suptitle(title + ": spatial attention", fontsize=9)
  fig.tight_layout()
  return save(fig, path)


def draw_channel_weights(weights, path: str, title: str) -> Pictures:
  """Each block's channel gate ``[(module, [channels])]`` as bars (one panel per block)."""
  fig, axes = plt.subplots(len(weights), 1, figsize=(6, 1.3 * len(weights) + 0.6),
                           dpi=100, squeeze=False)
  for ax, (module, w) in zip(axes[:, 0], weights):
    ax.bar(np.arange(len(w)), w, width=1.0, color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.5, len(w) - 0.5)
    ax.set_ylabel(_short(module), fontsize=7, rotation=0, ha="right", va="center")
    ax.tick_params(labelsize=6)
  axes[-1, 0].set_xlabel("channel", fontsize=8)
  fig.suptitle(title + ": channel attention weights", fontsize=9)
  fig.tight_layout()
  return save(fig, path)


def draw_cnn_examples(out_dir, inputs, labels, predictions, intermediates,
                      vocabulary=None, class_names=None) -> Pictures:
  """Per image of ``inputs`` ``[batch, height, width, channels]``: the input,
  the spatial maps over it (CBAM) and the channel gates per block."""
  pictures: Pictures = {}
  spatial = collect_sown(intermediates, "spatial_map")
  channel = collect_sown(intermediates, "channel_weights")
  _check_rank("spatial_map", spatial, 3, "[batch, height, width]")
  _check_rank("channel_weights", channel, 2, "[batch, channels]")
  for i in range(len(inputs)):
    tag = f"example{i}_label{labels[i]}_pred{predictions[i]}"
    title = f"label {labels[i]}, predicted {predictions[i]}"
    pictures.update(draw_input_image(inputs[i], os.path.join(out_dir, f"{tag}_input.png"),
                                     title))
    if spatial:
      pictures.update(draw_spatial_maps(
          inputs[i], [(m, a[i]) for m, a in spatial],
          os.path.join(out_dir, f"{tag}_spatial.png"), title))
    if channel:
      pictures.update(draw_channel_weights(
          [(m, a[i]) for m, a in channel],
          os.path.join(out_dir, f"{tag}_channels.png"), title))
  return pictures


__all__ = ["draw_channel_weights", "draw_cnn_examples", "draw_spatial_maps"]
