"""Pictures of attention.

- ``drawers``: ``DRAWERS`` (``config.viz.kind`` -> drawer) and
  ``draw_attention``, the one entry point the training loop calls.
- One drawer module per model family: ``images`` (ViT, pixel Transformer),
  ``cnn`` (SE, ECA, CBAM), ``text``, ``alignment`` (seq2seq), ``speech``.
- ``sown``: collecting sown weights and checking their shape contracts.
- ``index``: the HTML index page and the text of labels and predictions.
- ``panels`` (input image, head grid), ``sequences`` (tokens, alignments,
  spectrograms), ``curves`` (training curves), ``rollout`` (attention
  rollout math), ``canvas`` (matplotlib set-up).
"""
