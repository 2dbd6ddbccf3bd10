"""Whole networks, built by name from ``config.model``."""

from __future__ import annotations

import dataclasses
from typing import Dict, Type

import flax.linen as nn

from attention_lab.models.image import PixelTransformer
from attention_lab.models.image import ResNet
from attention_lab.models.image import ViT
from attention_lab.models.seq2seq import Seq2Seq
from attention_lab.models.speech import ConformerClassifier
from attention_lab.models.speech import KeywordTransformer
from attention_lab.models.text import RnnAttentionClassifier
from attention_lab.models.text import TextTransformer

MODELS: Dict[str, Type[nn.Module]] = {
    "conformer": ConformerClassifier,
    "kwt": KeywordTransformer,
    "pixel_transformer": PixelTransformer,
    "resnet": ResNet,
    "rnn_attention": RnnAttentionClassifier,
    "seq2seq": Seq2Seq,
    "text_transformer": TextTransformer,
    "vit": ViT,
}


def build(model_config) -> nn.Module:
  """Instantiates ``MODELS[model_config.name]`` with the other config fields.

  Raises:
    ValueError: unknown model name, or a config field the model does not have.
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
  return cls(**fields)
