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


# --- detection (DETR) --------------------------------------------------------
#
# Labels are float32 ``[batch, max_objects, 5]``: ``ymin, xmin, ymax, xmax``
# (normalised, TFDS's order) and the class, padding rows class -1
# (``data/scenes.py``). The model gives per decoder layer class logits
# ``[layers, batch, queries, classes + 1]`` (last: no object) and boxes
# ``[layers, batch, queries, 4]`` in the same box order.


def box_area(boxes):
  """``[..., 4]`` (ymin, xmin, ymax, xmax) -> ``[...]``."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def generalized_iou(a, b):
  """Pairwise generalized IoU (Rezatofighi et al., 2019) of ``a [..., n, 4]``
  and ``b [..., m, 4]`` (ymin, xmin, ymax, xmax) -> ``[..., n, m]`` in
  [-1, 1]: IoU minus the share of the smallest enclosing box that neither
  box covers, so boxes that do not overlap still get a gradient towards each
  other."""
  a, b = a[..., :, None, :], b[..., None, :, :]
  low = jnp.maximum(a[..., :2], b[..., :2])
  high = jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.clip(high - low, 0.0), axis=-1)
  union = box_area(a) + box_area(b) - inter
  iou = inter / union
  enclosing = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:])
                       - jnp.minimum(a[..., :2], b[..., :2]), axis=-1)
  return iou - (enclosing - union) / enclosing


def hungarian_numpy(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """The query matched to each true object, image by image.

  Args:
    cost: ``[batch, queries, objects]`` matching costs.
    valid: bool ``[batch, objects]``, False at padding rows.

  Returns:
    int32 ``[batch, objects]``: the query of each valid object under the
    assignment of least total cost (``scipy.optimize.linear_sum_assignment``,
    a well-kept solver), each query used at most once; 0 at padding rows.
  """
  from scipy.optimize import linear_sum_assignment  # late: only detection needs it
  cost, valid = np.asarray(cost, np.float64), np.asarray(valid, bool)
  if valid.sum(-1).max(initial=0) > cost.shape[1]:
    raise ValueError(f"hungarian_numpy: an image has {int(valid.sum(-1).max())} objects "
                     f"but there are only {cost.shape[1]} queries")
  assigned = np.zeros(valid.shape, np.int32)
  for image in range(cost.shape[0]):
    objects = np.flatnonzero(valid[image])
    queries, columns = linear_sum_assignment(cost[image][:, objects])
    assigned[image, objects[columns]] = queries
  return assigned


def match_queries(cost, valid):
  """``hungarian_numpy`` from inside a jitted step, through
  ``jax.pure_callback``: the Hungarian algorithm has no good vectorised JAX
  form, scipy's is exact, and the cost matrices are small (``[batch, 12,
  5]``), so the trip to the host costs little beside the step, and the
  training loop stays the one every task uses. No gradient flows through an
  assignment (``stop_gradient``)."""
  cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
  return jax.pure_callback(hungarian_numpy, jax.ShapeDtypeStruct(valid.shape, jnp.int32),
                           cost, valid, vmap_method="sequential")


def _detection_terms(logits, boxes, label, weights):
  """Matched DETR loss terms of one decoder layer, per image.

  Args:
    logits: ``[batch, queries, classes + 1]``; boxes ``[batch, queries, 4]``.
    label: ``[batch, objects, 5]``.
    weights: ``config.detection`` (the cost and loss weights).

  Returns:
    ``{"class": cross-entropy summed over queries with no-object queries
    weighted by no_object_weight, "class_weight": that weight's sum, "l1",
    "giou": summed over matched objects, "objects": object count}``, each
    ``[batch]``.
  """
  no_object = logits.shape[-1] - 1
  true_boxes, classes = label[..., :4], label[..., 4].astype(jnp.int32)
  valid = classes >= 0
  probs = jax.nn.softmax(logits, axis=-1)                        # [b, q, c+1]
  # Class cost: minus the probability of the object's class (DETR's choice:
  # unlike the log-probability it is bounded, so it does not swamp the box
  # costs early on).
  class_cost = -jnp.take_along_axis(probs, jnp.maximum(classes, 0)[:, None, :], axis=-1)
  l1 = jnp.abs(boxes[:, :, None, :] - true_boxes[:, None, :, :]).sum(-1)   # [b, q, o]
  giou = generalized_iou(boxes, true_boxes)                                # [b, q, o]
  cost = (weights.class_weight * class_cost + weights.l1_weight * l1
          - weights.giou_weight * giou)
  assigned = match_queries(cost, valid)                                    # [b, o]
  matched = (assigned[:, None, :] == jnp.arange(logits.shape[1])[None, :, None]) \
      & valid[:, None, :]                                                  # [b, q, o]
  target = jnp.where(matched.any(-1), (matched * classes[:, None, :]).sum(-1), no_object)
  query_weight = jnp.where(target == no_object, weights.no_object_weight, 1.0)
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, target)
  pair = lambda cost_matrix: (cost_matrix * matched).sum((1, 2))
  return {"class": (cross_entropy * query_weight).sum(-1),
          "class_weight": query_weight.sum(-1),
          "l1": pair(l1), "giou": pair(1.0 - giou),
          "objects": valid.sum(-1).astype(jnp.float32)}


def _detection_train_loss(outputs, batch, config):
  """DETR's set loss: each true object matched to one query (Hungarian, on
  class + L1 + GIoU costs), then cross-entropy of every query's class (the
  unmatched ones against "no object", down-weighted), L1 and 1 - GIoU of the
  matched boxes averaged over the batch's objects; summed over the decoder
  layers when ``config.detection.aux_loss`` (each layer matched on its own),
  which trains the early layers directly and speeds up convergence."""
  weights = config.detection
  logits, boxes = outputs["logits"].astype(jnp.float32), outputs["boxes"].astype(jnp.float32)
  layers = range(logits.shape[0]) if weights.aux_loss else [logits.shape[0] - 1]
  total, metrics = 0.0, {}
  for layer in layers:
    terms = _detection_terms(logits[layer], boxes[layer], batch["label"], weights)
    objects = jnp.maximum(terms["objects"].sum(), 1.0)
    parts = {"class_loss": terms["class"].sum() / terms["class_weight"].sum(),
             "l1_loss": terms["l1"].sum() / objects,
             "giou_loss": terms["giou"].sum() / objects}
    total = total + (weights.class_weight * parts["class_loss"]
                     + weights.l1_weight * parts["l1_loss"]
                     + weights.giou_weight * parts["giou_loss"])
    metrics = parts                      # the last layer's, for the logs
  return total, {"loss": total, **metrics}


def detections(outputs):
  """The last decoder layer's detections ``[batch, queries, 6]``: box
  (ymin, xmin, ymax, xmax), class (the most likely object class) and score
  (its probability), DETR's own read-out: every query is a detection, ranked
  by score, with no non-maximum suppression."""
  probs = jax.nn.softmax(outputs["logits"][-1].astype(jnp.float32), axis=-1)[..., :-1]
  return jnp.concatenate([outputs["boxes"][-1].astype(jnp.float32),
                          jnp.argmax(probs, -1)[..., None].astype(jnp.float32),
                          probs.max(-1, keepdims=True)], axis=-1)


# A detection counts as present for the count metrics at this score.
DETECTION_THRESHOLD = 0.5


def _detection_eval_sums(outputs, batch):
  """Per image, without matching: ``count_accuracy`` (as many detections
  scoring at least 0.5 as true objects) and ``count_error`` (the absolute
  difference). mAP, which ranks detections over the whole split, comes from
  ``_detection_corpus_metrics``."""
  found = (detections(outputs)[..., 5] >= DETECTION_THRESHOLD).sum(-1)
  true = (batch["label"][..., 4] >= 0).sum(-1)
  weight = batch["weight"]
  return {"count_accuracy": ((found == true) * weight).sum(),
          "count_error": (jnp.abs(found - true) * weight).sum()}


def coco_map(predictions, labels) -> Dict[str, float]:
  """COCO box mAP of detections, from pycocotools (the reference
  implementation: 101-point interpolated precision, greedy matching by
  score at each IoU threshold, classes averaged).

  Args:
    predictions: ``[images, detections, 6]`` (``detections``' layout).
    labels: ``[images, objects, 5]``, padding rows class -1.

  Returns:
    ``map`` (mAP@[.5:.95]), ``map_50`` and ``map_75``, over all object sizes
    (boxes are normalised, so COCO's pixel-area buckets do not apply).
  """
  import contextlib
  import io
  from pycocotools.coco import COCO  # late: only detection evaluation needs it
  from pycocotools.cocoeval import COCOeval
  predictions, labels = np.asarray(predictions, np.float64), np.asarray(labels, np.float64)
  if predictions.ndim != 3 or predictions.shape[-1] != 6 or labels.ndim != 3 \
      or labels.shape[-1] != 5 or len(predictions) != len(labels):
    raise ValueError(f"coco_map: predictions [images, detections, 6] and labels "
                     f"[images, objects, 5] expected, got {predictions.shape} and "
                     f"{labels.shape}")
  as_xywh = lambda b: [b[1], b[0], b[3] - b[1], b[2] - b[0]]  # COCO: x, y, width, height
  truth, found = [], []
  for image, rows in enumerate(labels):
    for row in rows[rows[:, 4] >= 0]:
      box = as_xywh(row)
      truth.append({"id": len(truth) + 1, "image_id": image, "category_id": int(row[4]) + 1,
                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
  for image, rows in enumerate(predictions):
    for row in rows:
      found.append({"image_id": image, "category_id": int(row[4]) + 1,
                    "bbox": as_xywh(row), "score": float(row[5])})
  if not truth:
    raise ValueError("coco_map: the labels hold no object")
  if not found:                       # nothing detected: no precision anywhere
    return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
  # pycocotools prints its progress and tables; the numbers come back below.
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in range(len(labels))], "annotations": truth,
                  "categories": [{"id": c} for c in
                                 sorted({t["category_id"] for t in truth}
                                        | {f["category_id"] for f in found})]}
    gt.createIndex()
    evaluation = COCOeval(gt, gt.loadRes(found), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  stats = evaluation.stats
  return {"map": float(stats[0]), "map_50": float(stats[1]), "map_75": float(stats[2])}


def error_rates(hypotheses: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
  """``{"wer", "cer"}``: corpus word and character error rates (edit
  distance summed over the corpus over the reference's length, in [0, inf))
  computed by jiwer."""
  import jiwer  # late: only speech recognition evaluation needs it
  if len(hypotheses) != len(references):
    raise ValueError(f"error_rates: {len(hypotheses)} hypotheses but {len(references)} references")
  # jiwer rejects an empty reference; every transcript of the grammar has words.
  return {"wer": float(jiwer.wer(list(references), list(hypotheses))),
          "cer": float(jiwer.cer(list(references), list(hypotheses)))}


def _recognition_corpus_metrics(predictions, labels, vocabulary):
  """``wer`` and ``cer`` of the greedy transcripts (character tokens)."""
  if vocabulary is None:
    raise ValueError("speech recognition corpus metrics need the dataset's vocabulary")
  return error_rates([token_text(p, vocabulary) for p in predictions],
                     [token_text(t, vocabulary) for t in labels])


def _detection_corpus_metrics(predictions, labels, vocabulary):
  del vocabulary  # boxes have no tokens
  return coco_map(predictions, labels)


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
    # Transcripts are character seq2seq: the same loss and sums (exact
    # match, token accuracy), and word and character error rates.
    "speech_recognition": Task(_seq2seq_train_loss, _seq2seq_eval_sums, _greedy_tokens,
                               _recognition_corpus_metrics),
    "keyframes": Task(_keyframe_train_loss, _keyframe_eval_sums, _sigmoid,
                      _keyframe_corpus_metrics),
    "detection": Task(_detection_train_loss, _detection_eval_sums, detections,
                      _detection_corpus_metrics),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
  return TASKS[name]
