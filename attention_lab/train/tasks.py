"""Losses and metrics per task, chosen by ``config.task``.

A task knows how to score model outputs against a batch; the training loop is
the same for all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import numpy as np

import jax
import jax.numpy as jnp
import optax

# Target padding id of the seq2seq task (the character vocabularies put it at 0).
SEQ_PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class Task:
  """``train_loss(outputs, batch, config) -> (loss, {name: scalar})``,
  ``eval_sums(outputs, batch) -> {name: weighted sum}`` (eval metrics are the
  sums divided by the summed ``weight``) and ``predict(outputs) -> labels``
  (class ids, or token ids for seq2seq) for pictures.

  ``corpus_metrics(predictions, labels, vocabulary) -> {name: value}``, when
  set, scores the whole eval split at once on the host (metrics that are not
  sums over examples, such as corpus BLEU): ``predictions`` and ``labels``
  are the ``predict`` outputs and labels of every eval example, in order.
  """
  train_loss: Callable
  eval_sums: Callable
  predict: Callable
  corpus_metrics: Optional[Callable] = None


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


def _target_mask(targets):
  """True at the target's tokens and its ``<eos>``; False at the padding after."""
  return targets != SEQ_PAD_ID


def _seq2seq_train_loss(outputs, batch, config):
  """Teacher-forced token cross-entropy, averaged over non-padding targets."""
  logits, targets = outputs["logits"], batch["label"]
  mask = _target_mask(targets).astype(jnp.float32)
  smoothed = optax.smooth_labels(jax_one_hot(targets, logits.shape[-1]), config.label_smoothing)
  loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), smoothed)
  loss = (loss * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  correct = (jnp.argmax(logits, -1) == targets) * mask
  return loss, {"loss": loss, "token_accuracy": correct.sum() / jnp.maximum(mask.sum(), 1.0)}


def _seq2seq_eval_sums(outputs, batch):
  """Scores the greedy translation ``outputs["tokens"]``: ``exact_match``
  (every target token and the ``<eos>`` right, the task's metric) and
  ``token_accuracy`` per example; ``loss`` is the teacher-forced
  cross-entropy per target token (greedy outputs have no likelihood of the
  target once they differ from it)."""
  targets, weight = batch["label"], batch["weight"]
  mask = _target_mask(targets)
  maskf = mask.astype(jnp.float32)
  count = jnp.maximum(maskf.sum(-1), 1.0)
  right = (outputs["tokens"] == targets) & mask
  exact = jnp.all(right | ~mask, axis=-1).astype(jnp.float32)
  tokens = right.sum(-1) / count
  loss = (optax.softmax_cross_entropy_with_integer_labels(
      outputs["logits"].astype(jnp.float32), targets) * maskf).sum(-1) / count
  return {"exact_match": (exact * weight).sum(), "token_accuracy": (tokens * weight).sum(),
          "loss": (loss * weight).sum()}


def token_text(ids, vocabulary: Sequence[str], separator: str = "") -> str:
  """The string of one row of token ids: up to the first ``<eos>``, with
  padding and ``<bos>`` left out (the text a translation reads as), tokens
  joined by ``separator`` (characters: none; words: a space)."""
  chars = []
  for i in np.asarray(ids).tolist():
    token = vocabulary[i]
    if token == "<eos>":
      break
    if token not in ("<pad>", "<bos>"):
      chars.append(token)
  return separator.join(chars)


# BLEU over characters: the targets are single compound words in German
# ("dreihundertzweiundvierzig"), where word n-grams would not exist.
BLEU_TOKENIZE = "char"


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str],
                tokenize: str = BLEU_TOKENIZE) -> float:
  """Corpus BLEU (0-100) of ``hypotheses`` against one reference each,
  computed by sacrebleu (its standard brevity penalty and n-gram counts up to
  4) over characters (``BLEU_TOKENIZE``) or, with ``tokenize="13a"``
  (sacrebleu's default), over words."""
  from sacrebleu.metrics import BLEU  # late: only seq2seq evaluation needs it
  if len(hypotheses) != len(references):
    raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses but "
                     f"{len(references)} references")
  return float(BLEU(tokenize=tokenize).corpus_score(
      list(hypotheses), [list(references)]).score)


def _seq2seq_corpus_metrics(predictions, labels, vocabulary):
  """``bleu``: character-level corpus BLEU of the greedy translations."""
  if vocabulary is None:
    raise ValueError("seq2seq corpus metrics need the dataset's vocabulary")
  return {"bleu": corpus_bleu([token_text(p, vocabulary) for p in predictions],
                              [token_text(t, vocabulary) for t in labels])}


def _caption_train_loss(outputs, batch, config):
  """The seq2seq loss plus the model's ``attention_penalty`` when it has one
  (the doubly stochastic attention regulariser, already weighted by lambda
  and per caption token)."""
  loss, metrics = _seq2seq_train_loss(outputs, batch, config)
  penalty = outputs.get("attention_penalty")
  if penalty is None:
    return loss, metrics
  return loss + penalty, dict(metrics, cross_entropy=loss, loss=loss + penalty,
                              attention_penalty=penalty)


# Captions are words: BLEU-4 over them, tokenised as sacrebleu does by default.
CAPTION_BLEU_TOKENIZE = "13a"


def _caption_corpus_metrics(predictions, labels, vocabulary):
  """``bleu``: word-level corpus BLEU-4 (0-100) of the greedy captions."""
  if vocabulary is None:
    raise ValueError("captioning corpus metrics need the dataset's vocabulary")
  text = lambda ids: token_text(ids, vocabulary, separator=" ")
  return {"bleu": corpus_bleu([text(p) for p in predictions], [text(t) for t in labels],
                              tokenize=CAPTION_BLEU_TOKENIZE)}


def _keyframe_train_loss(logits, batch, config):
  """Per-frame sigmoid cross-entropy of keyframe logits ``[batch, frames]``
  against 0/1 labels, averaged over frames."""
  del config  # no label smoothing for binary labels
  labels = batch["label"]
  logits = logits.astype(jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean()
  accuracy = ((logits > 0) == (labels > 0)).mean()
  return loss, {"loss": loss, "frame_accuracy": accuracy}


def _keyframe_eval_sums(logits, batch):
  """Per clip: mean frame loss and frame accuracy (at probability 0.5); F1
  and average precision, which are not sums over clips, come from
  ``_keyframe_corpus_metrics``."""
  labels, weight = batch["label"], batch["weight"]
  logits = logits.astype(jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean(-1)
  accuracy = ((logits > 0) == (labels > 0)).astype(jnp.float32).mean(-1)
  return {"loss": (loss * weight).sum(), "frame_accuracy": (accuracy * weight).sum()}


def _sigmoid(logits):
  """Keyframe probabilities ``[batch, frames]``: what the metrics rank and
  the pictures plot."""
  return jax.nn.sigmoid(logits.astype(jnp.float32))


# A frame is called a keyframe when its probability reaches this.
KEYFRAME_THRESHOLD = 0.5


def frame_scores(scores, labels, threshold: float = KEYFRAME_THRESHOLD) -> Dict[str, float]:
  """Frame-level detection metrics over all frames of all clips.

  Args:
    scores: keyframe probabilities, any shape (``[clips, frames]``).
    labels: 0/1 of the same shape, with at least one 1.
    threshold: a frame with ``score >= threshold`` is predicted a keyframe.

  Returns:
    ``precision``, ``recall`` and ``f1`` of the thresholded predictions
    (0 where undefined) and ``average_precision`` of the scores, all from
    scikit-learn (its AP is the step-wise area under the precision-recall
    curve, without interpolation).
  """
  from sklearn import metrics  # late: only keyframe evaluation needs it
  scores, labels = np.ravel(scores), np.ravel(labels).astype(np.int64)
  if scores.shape != labels.shape:
    raise ValueError(f"frame_scores: {scores.size} scores but {labels.size} labels")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"frame_scores: labels must be 0 or 1, got {sorted(set(labels.tolist()))}")
  if not labels.any():
    raise ValueError("frame_scores: average precision needs at least one keyframe label")
  predicted = (scores >= threshold).astype(np.int64)
  precision, recall, f1, _ = metrics.precision_recall_fscore_support(
      labels, predicted, average="binary", zero_division=0)
  return {"precision": float(precision), "recall": float(recall), "f1": float(f1),
          "average_precision": float(metrics.average_precision_score(labels, scores))}


def _keyframe_corpus_metrics(predictions, labels, vocabulary):
  del vocabulary  # frames have no tokens
  return frame_scores(predictions, labels)


def _argmax(logits):
  return jnp.argmax(logits, -1)


def _greedy_tokens(outputs):
  return outputs["tokens"]


TASKS: Dict[str, Task] = {
    "classification": Task(_classification_train_loss, _classification_eval_sums, _argmax),
    "seq2seq": Task(_seq2seq_train_loss, _seq2seq_eval_sums, _greedy_tokens,
                    _seq2seq_corpus_metrics),
    # Exact caption match and token accuracy of the greedy caption are the
    # seq2seq sums; BLEU is over words.
    "captioning": Task(_caption_train_loss, _seq2seq_eval_sums, _greedy_tokens,
                       _caption_corpus_metrics),
    "keyframes": Task(_keyframe_train_loss, _keyframe_eval_sums, _sigmoid,
                      _keyframe_corpus_metrics),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
  return TASKS[name]
