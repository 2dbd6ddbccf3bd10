"""Which drawer draws which ``config.viz.kind``, and the one entry point that
draws a run's examples and their index page.

To add a kind: write ``viz/<family>.py`` with a function of the ``Drawer``
signature, import it here and add one entry to ``DRAWERS``; config validation
(``train.validation``) accepts exactly the kinds in this table.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, Sequence

import numpy as np

from attention_lab.viz import index
from attention_lab.viz.alignment import draw_alignment_examples
from attention_lab.viz.captions import draw_caption_examples
from attention_lab.viz.canvas import Pictures
from attention_lab.viz.cnn import draw_cnn_examples
from attention_lab.viz.detection import draw_detection_examples
from attention_lab.viz.images import draw_image_examples
from attention_lab.viz.speech import draw_speech_examples
from attention_lab.viz.text import draw_text_examples
from attention_lab.viz.transcripts import draw_transcript_examples
from attention_lab.viz.translation import draw_translation_examples
from attention_lab.viz.video import draw_video_examples


class Drawer(Protocol):
  """Draws the examples of one model family into ``out_dir``.

  Args:
    out_dir: where the pictures go (names start ``example{i}_``).
    inputs: the model's inputs for ``n`` examples (an array, or a dict of them).
    labels: ``[n]`` class ids, or ``[n, length]`` token ids.
    predictions: the task's predictions, shaped as ``labels``.
    intermediates: the ``intermediates`` collection the model sowed.
    vocabulary: token strings by id (text and seq2seq data), else None.
    class_names: class names by id, else None.

  Returns:
    ``{path: rgb uint8 array or None for HTML}`` of what was drawn.
  """

  def __call__(self, out_dir: str, inputs: Any, labels: np.ndarray,
               predictions: np.ndarray, intermediates: Any,
               vocabulary: Optional[Sequence[str]] = None,
               class_names: Optional[Sequence[str]] = None) -> Pictures:
    ...


# config.viz.kind -> the drawer of that model family.
DRAWERS: Dict[str, Drawer] = {
    "alignment": draw_alignment_examples,
    "caption": draw_caption_examples,
    "cnn": draw_cnn_examples,
    "cross_attention": draw_translation_examples,
    "detection": draw_detection_examples,
    "image": draw_image_examples,
    "speech": draw_speech_examples,
    "text": draw_text_examples,
    "transcript": draw_transcript_examples,
    "video": draw_video_examples,
}


def draw_examples(kind: str, out_dir: str, **arrays) -> Pictures:
  """Draws the pictures of ``kind`` (``config.viz.kind``) into ``out_dir``;
  ``arrays`` are the ``Drawer`` arguments."""
  if kind not in DRAWERS:
    raise ValueError(f"unknown viz kind {kind!r}; known: {', '.join(sorted(DRAWERS))}")
  return DRAWERS[kind](out_dir, **arrays)


def draw_attention(kind: str, out_dir: str, title: str, *, inputs, labels, predictions,
                   intermediates, vocabulary=None, class_names=None) -> Pictures:
  """Replaces the pictures in ``out_dir`` by those of these examples and an
  ``index.html`` showing them all, titled ``title``.

  Arguments are the ``Drawer``'s (host arrays, ``n`` examples).

  Returns:
    ``{path: rgb uint8 array}`` of the pictures (for TensorBoard).
  """
  index.clear_pictures(out_dir)
  pictures = draw_examples(kind, out_dir, inputs=inputs, labels=labels,
                           predictions=predictions, intermediates=intermediates,
                           vocabulary=vocabulary, class_names=class_names)
  index.write_index(out_dir, title,
                    index.describe(labels, vocabulary, class_names),
                    index.describe(predictions, vocabulary, class_names), pictures,
                    inputs=index.describe_inputs(inputs, vocabulary))
  return pictures


__all__ = ["DRAWERS", "Drawer", "draw_attention", "draw_examples"]
