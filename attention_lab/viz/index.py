"""The HTML index page of a drawing: one row per example, its label,
prediction and pictures; plus the text shown for labels and predictions and
the TensorBoard tags of the pictures."""

from __future__ import annotations

import html
import os
import re
from typing import List

import numpy as np

from attention_lab.viz.canvas import Pictures
from attention_lab.viz.sequences import tokens_of


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
  if name.endswith(".html"):
    with open(os.path.join(out_dir, name)) as f:
      return f.read()
  return (f'<a href="{html.escape(name)}"><img src="{html.escape(name)}" '
          f'title="{html.escape(name)}"></a>')


def describe(values, vocabulary=None, class_names=None) -> List[str]:
  """Labels or predictions as text for the index page: class ids ``[n]`` as
  numbers (or ``class_names``), token sequences ``[n, length]`` as the string
  they spell (without ``<eos>``)."""
  values = np.asarray(values)
  if values.ndim == 1 and class_names is not None:
    return [class_names[v] for v in values.tolist()]
  if values.ndim == 1 or vocabulary is None:
    return [str(v) for v in values.tolist()]
  # Characters join as they are; words (any token longer than a character)
  # with spaces.
  separator = " " if any(len(t) > 1 for t in vocabulary if not t.startswith("<")) else ""
  return [separator.join(t for t in tokens_of(row, vocabulary) if t != "<eos>")
          for row in values]


def describe_inputs(inputs, vocabulary=None):
  """The source text of each seq2seq example (inputs ``{"source": ...}``), or
  None where the pictures show the input already."""
  if not isinstance(inputs, dict) or "source" not in inputs or vocabulary is None:
    return None
  return describe(inputs["source"], vocabulary)


__all__ = ["clear_pictures", "describe", "describe_inputs", "picture_tag", "write_index"]
