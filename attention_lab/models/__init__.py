"""Whole networks, built by name from ``config.model``."""

from __future__ import annotations

import dataclasses
from typing import Dict, Type

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_lab.layers import AttentionConfig
from attention_lab.models.detection import DETR
from attention_lab.models.captioning import ShowAttendTell
from attention_lab.models.captioning import TransformerCaptioner
from attention_lab.models.image import PixelTransformer
from attention_lab.models.image import ResNet
from attention_lab.models.image import ViT
from attention_lab.models.seq2seq import Seq2Seq
from attention_lab.models.speech import ConformerClassifier
from attention_lab.models.speech import KeywordTransformer
from attention_lab.models.speech_recognition import SpeechRecognizer
from attention_lab.models.text import RnnAttentionClassifier
from attention_lab.models.text import TextTransformer
from attention_lab.models.transformer_seq2seq import TransformerSeq2Seq
from attention_lab.models.video import KeyframeDetector

MODELS: Dict[str, Type[nn.Module]] = {
    "conformer": ConformerClassifier,
    "detr": DETR,
    "keyframe_detector": KeyframeDetector,
    "kwt": KeywordTransformer,
    "pixel_transformer": PixelTransformer,
    "resnet": ResNet,
    "rnn_attention": RnnAttentionClassifier,
    "seq2seq": Seq2Seq,
    "show_attend_tell": ShowAttendTell,
    "speech_recognizer": SpeechRecognizer,
    "text_transformer": TextTransformer,
    "transformer_captioner": TransformerCaptioner,
    "transformer_seq2seq": TransformerSeq2Seq,
    "vit": ViT,
}

# ``config.model.dtype``: the dtype activations are computed in. Parameters stay
# float32 whatever it is (each layer's ``param_dtype``), and so do the loss and
# metrics (``train/tasks.py``).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# "auto": bfloat16 where the default backend is a TPU (its matrix units' native
# type), float32 elsewhere.
COMPUTE_DTYPE_NAMES = ("auto",) + tuple(COMPUTE_DTYPES)


def compute_dtype(name, backend=None):
  """``config.model.dtype`` (a string) -> the jnp dtype.

  Args:
    name: one of ``COMPUTE_DTYPE_NAMES``.
    backend: the platform ``"auto"`` resolves for (default: JAX's default
      backend).

  Raises:
    ValueError: a name outside ``COMPUTE_DTYPE_NAMES``, naming the field.
  """
  if name == "auto":
    return jnp.bfloat16 if (backend or jax.default_backend()) == "tpu" else jnp.float32
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.model.dtype must be one of "
                     f"{', '.join(map(repr, COMPUTE_DTYPE_NAMES))}; got {name!r}")
  return COMPUTE_DTYPES[name]


def build(model_config) -> nn.Module:
  """Instantiates ``MODELS[model_config.name]`` with the other config fields.

  ``dtype`` is given as a name (``"bfloat16"``) and passed on as the jnp dtype.

  Raises:
    ValueError: unknown model name, a config field the model does not have, or
      an unknown ``dtype``.
  """
  fields = dict(model_config)
  name = fields.pop("name", None)
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
  cls = MODELS[name]
  known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(
        f"model {name!r} has no field(s) {unknown}; its fields: {', '.join(sorted(known))}")
  if "dtype" in fields:
    fields["dtype"] = compute_dtype(fields["dtype"])
  if "attention" in fields and takes_attention_config(cls):
    fields["attention"] = AttentionConfig.from_config(fields["attention"])
  return cls(**fields)


def takes_attention_config(cls) -> bool:
  """Whether a model's ``attention`` field is an ``AttentionConfig`` (the
  RNN translator's attention is its score, a name)."""
  field = {f.name: f for f in dataclasses.fields(cls)}.get("attention")
  return field is not None and isinstance(field.default, AttentionConfig)
