"""Pictures of a run: training curves and what each model family attends to.

``draw_examples(kind, ...)`` draws the examples of one ``config.viz.kind``
(``image``: ViT and pixel Transformer; ``cnn``: convolutional attention) and
``write_index`` puts them on one HTML page. Drawing functions return
``{path: rgb uint8 array}`` (see ``canvas``) so the pictures also go to
TensorBoard. Sequence pictures (tokens, alignments, spectrograms) are in
``sequences``.
"""

from __future__ import annotations

import os
import re
from typing import List, Tuple

import numpy as np

from attention_lab.viz import sequences
from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save as _save
from attention_lab.viz.rollout import attention_rollout
from attention_lab.viz.rollout import tokens_to_grid
from attention_lab.viz.rollout import upsample


def picture_tag(path: str) -> str:
  """A TensorBoard tag that stays the same across evaluations:
  ``example0_label6_pred5_heads.png`` -> ``attention/example0_heads``."""
  name = os.path.splitext(os.path.basename(path))[0]
  return "attention/" + re.sub(r"_label[^_]*_pred[^_]*", "", name)


def clear_pictures(out_dir: str) -> None:
  """Removes the example pictures and index of an earlier drawing (their names
  carry predictions, so new ones would not overwrite them)."""
  if not os.path.isdir(out_dir):
    return
  for name in os.listdir(out_dir):
    if (name.startswith("example") and name.endswith((".png", ".html"))) or name == "index.html":
      os.remove(os.path.join(out_dir, name))


def write_index(out_dir: str, title: str, labels, predictions, pictures: Pictures,
                inputs=None) -> str:
  """``out_dir/index.html``: one row per example with its label, prediction and
  every picture drawn of it (the input first); ``inputs``, optional strings,
  are shown above the label where an input reads best as text."""
  import html
  rows = []
  for i, (label, pred) in enumerate(zip(labels, predictions)):
    shown = f"<br>input <b>{html.escape(inputs[i])}</b>" if inputs is not None else ""
    names = sorted((os.path.basename(p) for p in pictures
                    if os.path.basename(p).startswith(f"example{i}_")),
                   key=lambda n: (not n.endswith("_input.png"), n))
    verdict = "correct" if label == pred else "wrong"
    cells = "".join(_index_cell(out_dir, n) for n in names)
    rows.append(f'<tr class="{verdict}"><td>example {i}{shown}<br>label <b>{html.escape(str(label))}</b>'
                f'<br>predicted <b>{html.escape(str(pred))}</b><br>{verdict}</td>'
                f'<td>{cells}</td></tr>')
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
td {{ vertical-align: top; padding: 6px; border-bottom: 1px solid #ddd; }}
img {{ max-height: 260px; margin: 2px; }}
tr.wrong td:first-child {{ color: #b00; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<table>{''.join(rows)}</table>
</body></html>
"""
  path = os.path.join(out_dir, "index.html")
  os.makedirs(out_dir, exist_ok=True)
  with open(path, "w") as f:
    f.write(page)
  return path


def _index_cell(out_dir: str, name: str) -> str:
  """An image, or an HTML fragment (coloured tokens) inlined."""
  import html
  if name.endswith(".html"):
    with open(os.path.join(out_dir, name)) as f:
      return f.read()
  return (f'<a href="{html.escape(name)}"><img src="{html.escape(name)}" '
          f'title="{html.escape(name)}"></a>')


def draw_input_image(image: np.ndarray, path: str, title: str) -> Pictures:
  """The input image alone, for the index page."""
  fig, ax = plt.subplots(figsize=(2.2, 2.4), dpi=100)
  _show_image(ax, image)
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def _natural_key(path):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def collect_sown(intermediates, name: str) -> List[Tuple[str, np.ndarray]]:
  """``(module path, array)`` of every value sown as ``name``, in layer order
  (``block_2`` before ``block_10``)."""
  import jax  # late: keeps this module importable for plotting alone
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if name in keys:
      module = "/".join(str(k) for k in keys[:keys.index(name)])
      found.append((module, np.asarray(leaf)))
  found.sort(key=lambda item: _natural_key(item[0]))
  return found


def collect_attention(intermediates) -> List[np.ndarray]:
  """Sown ``attention_weights`` in layer order.

  Returns:
    list of ``[batch, heads, q_length, kv_length]`` arrays.
  """
  return [w for _, w in collect_sown(intermediates, "attention_weights")]


# Accuracy-like metrics drawn in the right panel, in order of preference.
_SCORES = ("accuracy", "exact_match", "token_accuracy")


def draw_curves(history: List[dict], path: str) -> Pictures:
  """Loss and the accuracy metrics (``accuracy``; ``exact_match`` and
  ``token_accuracy`` for seq2seq) against steps, train and eval."""
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
  return _save(fig, path)


def draw_head_grid(layer_weights: List[np.ndarray], example: int, path: str,
                   title: str = "", tokens=None) -> Pictures:
  """Query x key heat maps: one row per layer, one column per head.

  Args:
    layer_weights: per layer ``[batch, heads, q_length, kv_length]``.
    example: which batch entry to draw.
    tokens: optional token strings (self-attention: one per position) to
      label the axes with, when there are few enough to read.
  """
  layers = len(layer_weights)
  heads = layer_weights[0].shape[1]
  labelled = tokens is not None and len(tokens) <= sequences.MAX_LABELLED_TOKENS
  side = 1.8 if not labelled else max(1.8, 0.12 * len(tokens) + 0.8)
  fig, axes = plt.subplots(layers, heads, figsize=(side * heads, side * layers),
                           dpi=100, squeeze=False)
  for l, weights in enumerate(layer_weights):
    for h in range(heads):
      ax = axes[l, h]
      ax.imshow(weights[example, h], cmap="viridis", vmin=0.0)
      ax.set_xticks([])
      ax.set_yticks([])
      if labelled:
        names = [sequences.printable(t) for t in tokens]
        ax.set_xticks(np.arange(len(names)))
        ax.set_xticklabels(names, fontsize=5, rotation=90)
        ax.set_yticks(np.arange(len(names)))
        ax.set_yticklabels(names, fontsize=5)
      if l == 0:
        ax.set_title(f"head {h}", fontsize=8)
      if h == 0:
        ax.set_ylabel(f"layer {l}", fontsize=8)
  fig.suptitle(title or "attention weights (query rows x key columns)", fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def draw_image_overlay(image: np.ndarray, cls_map: np.ndarray,
                       rollout_map: np.ndarray, path: str, title: str) -> Pictures:
  """The input, the CLS token's last-layer attention and the rollout over it."""
  image = image[..., 0] if image.shape[-1] == 1 else image
  cmap = "gray" if image.ndim == 2 else None
  fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8), dpi=100)
  panels = (("input", None), ("attention, last layer", cls_map),
            ("attention rollout", rollout_map))
  for ax, (name, heat) in zip(axes, panels):
    ax.imshow(image, cmap=cmap)
    if heat is not None:
      ax.imshow(heat, cmap="inferno", alpha=0.55)
    ax.set_title(name, fontsize=8)
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def draw_image_examples(out_dir, inputs, labels, predictions, intermediates,
                        vocabulary=None, class_names=None) -> Pictures:
  """Image Transformer pictures (ViT, pixel Transformer): a head grid and the
  last layer's and the rollout's attention over the image, per example.

  With a CLS token (one token more than the image grid) the maps are the CLS
  row; with mean pooling, the average row (what all tokens attend to).
  """
  pictures: Pictures = {}
  attention = collect_attention(intermediates)
  if not attention:
    return pictures
  height, width = inputs.shape[1:3]
  rollout = attention_rollout(attention)                     # [batch, t, t]
  last = attention[-1].mean(axis=1)                          # [batch, t, t]
  tokens = last.shape[-1]
  if _tiles(tokens - 1, height, width):                      # CLS first
    last_row, roll_row = last[:, 0, 1:], rollout[:, 0, 1:]
  else:
    last_row, roll_row = last.mean(axis=1), rollout.mean(axis=1)
  for i in range(len(inputs)):
    tag = f"example{i}_label{labels[i]}_pred{predictions[i]}"
    pictures.update(draw_input_image(inputs[i], os.path.join(out_dir, f"{tag}_input.png"),
                                     f"label {labels[i]}, predicted {predictions[i]}"))
    cls_map = upsample(tokens_to_grid(last_row[i], height, width), height, width)
    roll_map = upsample(tokens_to_grid(roll_row[i], height, width), height, width)
    pictures.update(draw_image_overlay(
        inputs[i], cls_map, roll_map, os.path.join(out_dir, f"{tag}_overlay.png"),
        f"label {labels[i]}, predicted {predictions[i]}"))
    pictures.update(draw_head_grid(
        attention, i, os.path.join(out_dir, f"{tag}_heads.png")))
  return pictures


def _tiles(n: int, height: int, width: int) -> bool:
  if n < 1:
    return False
  try:
    tokens_to_grid(np.zeros(n), height, width)
    return True
  except ValueError:
    return False


def _show_image(ax, image):
  image = image[..., 0] if image.shape[-1] == 1 else image
  ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
  ax.axis("off")


def _short(module: str) -> str:
  """``stage1_block0/attention`` -> ``stage1_block0``."""
  return module.rsplit("/attention", 1)[0]


def draw_spatial_maps(image, maps, path: str, title: str) -> Pictures:
  """The input and each block's spatial attention map (CBAM) over it.

  Each map is stretched to its own range (printed in its title): the gates of
  a block often differ by a few tenths, which a fixed 0-1 scale would hide.
  """
  height, width = image.shape[:2]
  fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.3 * (len(maps) + 1), 2.6),
                           dpi=100, squeeze=False)
  _show_image(axes[0, 0], image)
  axes[0, 0].set_title("input", fontsize=8)
  for ax, (module, heat) in zip(axes[0, 1:], maps):
    _show_image(ax, image)
    ax.imshow(heat, cmap="inferno", alpha=0.6, interpolation="bilinear",
              extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    ax.set_title(f"{_short(module)} {heat.shape[0]}x{heat.shape[1]}\n"
                 f"gate {heat.min():.2f}-{heat.max():.2f}", fontsize=7)
  fig.suptitle(title + ": spatial attention", fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def draw_channel_weights(weights, path: str, title: str) -> Pictures:
  """Each block's channel gate as bars (one panel per block)."""
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
  return _save(fig, path)


def draw_cnn_examples(out_dir, inputs, labels, predictions, intermediates,
                      vocabulary=None, class_names=None) -> Pictures:
  """CNN pictures: spatial maps over the input (CBAM) and channel gates per block."""
  pictures: Pictures = {}
  spatial = collect_sown(intermediates, "spatial_map")        # [(module, [b, h, w])]
  channel = collect_sown(intermediates, "channel_weights")    # [(module, [b, c])]
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


def tokens_of(ids, vocabulary) -> List[str]:
  """Token strings of ``ids`` ``[length]``: padding and ``<bos>`` dropped,
  reading up to and including ``<eos>`` (a decoder's last word)."""
  out = []
  for i in np.asarray(ids).tolist():
    token = vocabulary[i]
    if token in ("<pad>", "<bos>"):
      continue
    out.append(token)
    if token == "<eos>":
      break
  return out


def describe(values, vocabulary=None, class_names=None) -> List[str]:
  """Labels or predictions as text for the index page: class ids as numbers
  (or ``class_names``), token sequences ``[n, length]`` as the string they
  spell (without ``<eos>``)."""
  values = np.asarray(values)
  if values.ndim == 1 and class_names is not None:
    return [class_names[v] for v in values.tolist()]
  if values.ndim == 1 or vocabulary is None:
    return [str(v) for v in values.tolist()]
  return ["".join(t for t in tokens_of(row, vocabulary) if t != "<eos>") for row in values]


def describe_inputs(inputs, vocabulary=None):
  """The source text of each seq2seq example (inputs ``{"source": ...}``), or
  None where the pictures show the input already."""
  if not isinstance(inputs, dict) or "source" not in inputs or vocabulary is None:
    return None
  return describe(inputs["source"], vocabulary)


def _text_token_weights(intermediates, ids) -> Tuple[str, np.ndarray]:
  """``(what, [batch, length])``: attention pooling's weights when the model
  pools with attention, else the rollout row of the CLS token (or the mean
  row without one) of a Transformer; zeros at padding."""
  pooling = [w for _, w in collect_sown(intermediates, "attention_weights") if w.ndim == 3]
  if pooling:
    return "attention pooling", pooling[-1][:, 0]
  attention = collect_attention(intermediates)
  if not attention:
    return "", None
  rollout = attention_rollout(attention)                       # [batch, t, t]
  length = ids.shape[1]
  if rollout.shape[-1] == length + 1:                          # CLS first
    return "CLS attention rollout", rollout[:, 0, 1:]
  valid = (ids != 0).astype(np.float64)
  row = (rollout * valid[:, :, None]).sum(1) / np.maximum(valid.sum(1, keepdims=True), 1)
  return "mean attention rollout", row


def draw_text_examples(out_dir, inputs, labels, predictions, intermediates,
                       vocabulary=None, class_names=None) -> Pictures:
  """Text classifiers: the tokens coloured by attention (HTML), and for
  Transformers the head grid of every layer over the valid tokens."""
  if vocabulary is None:
    raise ValueError("draw_text_examples needs the dataset's vocabulary")
  pictures: Pictures = {}
  ids = np.asarray(inputs)
  what, weights = _text_token_weights(intermediates, ids)
  attention = collect_attention(intermediates)
  for i in range(len(ids)):
    tag = f"example{i}_label{labels[i]}_pred{predictions[i]}"
    valid = np.flatnonzero(ids[i] != 0)
    tokens = [vocabulary[t] for t in ids[i, valid]]
    if weights is not None:
      pictures.update(sequences.token_html(
          tokens, weights[i, valid], os.path.join(out_dir, f"{tag}_tokens.html"),
          f"{what}: label {labels[i]}, predicted {predictions[i]}"))
    layers = [w for w in attention if w.ndim == 4]
    if layers:
      offset = layers[0].shape[-1] - ids.shape[1]              # 1 with a CLS token
      keep = np.concatenate([np.arange(offset), valid + offset])
      grid = [w[:, :, keep][:, :, :, keep] for w in layers]
      names = ["CLS"] * offset + tokens
      pictures.update(draw_head_grid(grid, i, os.path.join(out_dir, f"{tag}_heads.png"),
                                     tokens=names))
  return pictures


def draw_alignment_examples(out_dir, inputs, labels, predictions, intermediates,
                            vocabulary=None, class_names=None) -> Pictures:
  """Seq2seq: the decoder's alignment (output x input characters) per example,
  with the output the model wrote (up to its ``<eos>``) on the rows."""
  if vocabulary is None:
    raise ValueError("draw_alignment_examples needs the dataset's vocabulary")
  pictures: Pictures = {}
  alignments = collect_sown(intermediates, "alignment")
  if not alignments:
    return pictures
  alignment = alignments[-1][1]                                # [batch, out, in]
  source = np.asarray(inputs["source"])
  for i in range(len(source)):
    valid = np.flatnonzero(source[i] != 0)
    input_tokens = [vocabulary[t] for t in source[i, valid]]
    output_tokens = tokens_of(predictions[i], vocabulary)
    verdict = "right" if tokens_of(labels[i], vocabulary) == output_tokens else "wrong"
    weights = alignment[i, :len(output_tokens)][:, valid]
    pictures.update(sequences.draw_alignment(
        weights, input_tokens, output_tokens,
        os.path.join(out_dir, f"example{i}_alignment.png"),
        f"{''.join(input_tokens)} -> {''.join(t for t in output_tokens if t != '<eos>')} "
        f"({verdict})"))
  return pictures


def spread_over_frames(weights: np.ndarray, frames: int) -> np.ndarray:
  """Weights over ``t`` evenly subsampled positions ``[..., t]`` -> ``[..., frames]``,
  linearly interpolated between the positions' centres and renormalised, so
  each value is a share of attention per input frame (rows sum to one)."""
  weights = np.asarray(weights, np.float64)
  t = weights.shape[-1]
  centres = (np.arange(t) + 0.5) * frames / t - 0.5
  spread = np.apply_along_axis(lambda w: np.interp(np.arange(frames), centres, w), -1, weights)
  return spread / np.maximum(spread.sum(axis=-1, keepdims=True), 1e-12)


def _speech_curves(intermediates, frames: int):
  """``{curve name: [batch, frames]}``: what each model attends to over time.

  A CLS token (KWT: one token per frame plus CLS) gives its last-layer row
  and its rollout row; attention pooling (Conformer) gives its weights and,
  pushed back through the blocks' rollout, where the pooled evidence came
  from (an approximation: rollout sees the attention, not the Conformer's
  convolutions, which also mix neighbouring frames); either over subsampled
  frames is spread back onto the spectrogram's.
  """
  layers = collect_attention(intermediates)
  self_attention = [w for w in layers if w.ndim == 4]
  pooling = [w for w in layers if w.ndim == 3]
  curves = {}
  if pooling:
    pooled = pooling[-1][:, 0]                                   # [batch, t]
    curves["attention pooling"] = pooled
    if self_attention and self_attention[-1].shape[-1] == pooled.shape[-1]:
      rollout = attention_rollout(self_attention)                # [batch, t, t]
      curves["pooling through rollout"] = np.einsum("bt,bts->bs", pooled, rollout)
  elif self_attention:
    tokens = self_attention[-1].shape[-1]
    first = 1 if tokens == frames + 1 else 0                     # CLS first
    rollout = attention_rollout(self_attention)
    if first:
      curves["CLS, last layer"] = self_attention[-1].mean(axis=1)[:, 0, 1:]
      curves["CLS rollout"] = rollout[:, 0, 1:]
    else:
      curves["mean rollout"] = rollout.mean(axis=1)
  return {name: spread_over_frames(w, frames) for name, w in curves.items()}


def draw_speech_examples(out_dir, inputs, labels, predictions, intermediates,
                         vocabulary=None, class_names=None) -> Pictures:
  """Speech classifiers: the log-mel spectrogram with the model's attention
  over time beneath it, and the head grid of the self-attention layers."""
  pictures: Pictures = {}
  spectrograms = collect_sown(intermediates, "spectrogram")
  if not spectrograms:
    raise ValueError("draw_speech_examples: the model sowed no 'spectrogram'; "
                     "speech pictures need the log-mel front end")
  spectrogram = spectrograms[0][1]                               # [batch, frames, mels]
  curves = _speech_curves(intermediates, spectrogram.shape[1])
  heads = [w for w in collect_attention(intermediates) if w.ndim == 4]
  name = (lambda c: class_names[c]) if class_names is not None else str
  for i in range(len(labels)):
    tag = f"example{i}_label{labels[i]}_pred{predictions[i]}"
    title = f"label {name(labels[i])}, predicted {name(predictions[i])}"
    pictures.update(sequences.draw_spectrogram_attention(
        spectrogram[i], {k: v[i] for k, v in curves.items()},
        os.path.join(out_dir, f"{tag}_spectrogram.png"), title))
    if heads:
      pictures.update(draw_head_grid(heads, i, os.path.join(out_dir, f"{tag}_heads.png"),
                                     title))
  return pictures


DRAWERS = {
    "alignment": draw_alignment_examples,
    "cnn": draw_cnn_examples,
    "image": draw_image_examples,
    "speech": draw_speech_examples,
    "text": draw_text_examples,
}


def draw_examples(kind: str, out_dir: str, **arrays) -> Pictures:
  """Draws the pictures of ``kind`` (``config.viz.kind``) into ``out_dir``."""
  if kind not in DRAWERS:
    raise ValueError(f"unknown viz kind {kind!r}; known: {', '.join(sorted(DRAWERS))}")
  return DRAWERS[kind](out_dir, **arrays)
