"""Attention-based speech recognition (Listen, Attend and Spell style):
characters written by a Transformer decoder that cross-attends to encoded
log-mel frames.

``SpeechRecognizer`` is ``TransformerSeq2Seq`` with the audio in place of an
embedded source: the log-mel front end (``layers.spectrogram``, SpecAugment
and frequency warp in training), two 3x3 stride-2 convolutions that subsample
time and frequency four times (as ``ConformerClassifier``: 198 frames of a
two-second clip -> 48), a projection to ``hidden_dim`` plus the sinusoidal
position code, then its Transformer encoder. Its decoder, teacher forcing and
key/value-cached greedy and beam decoding serve transcripts unchanged.

Evaluation (``train=False``) returns the greedy transcript, decoded from
``<bos>`` without reading the target, and (as in translation) sows each
decoder layer's cross-attention over the subsampled frames from a pass over
its own transcript: ``.../cross_attention/attention_weights`` ``[batch,
heads, characters, frames / 4]``; the front end sows ``spectrogram``
``[batch, frames, mels]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.layers.spectrogram import LogMelFrontEnd
from attention_lab.layers.spectrogram import LogMelSettings
from attention_lab.models.transformer_seq2seq import TransformerSeq2Seq
from attention_lab.models.transformer_seq2seq import _positions
from attention_lab.models.transformer_seq2seq import shift_right

SUBSAMPLING = 4     # two stride-2 convolutions


def subsampled_frames(frames: int) -> int:
  """Encoder positions of ``frames`` log-mel frames: two 3x3 stride-2 VALID
  convolutions, ``(n - 3) // 2 + 1`` each."""
  for _ in range(2):
    frames = (frames - 3) // 2 + 1
  return frames


class SpeechRecognizer(TransformerSeq2Seq, LogMelSettings):
  """Log-mel frames -> Transformer encoder -> character decoder with cross-attention.

  Attributes (besides ``TransformerSeq2Seq``'s and the front end's
  keyword-only ``LogMelSettings``):
    subsample_channels: channels of the two subsampling convolutions.
  """
  subsample_channels: int = 32

  def setup(self):
    super().setup()
    self.front_end = LogMelFrontEnd(**self.front_end_settings(), dtype=self.dtype)
    self.subsample = [nn.Conv(self.subsample_channels, (3, 3), strides=(2, 2),
                              padding="VALID", dtype=self.dtype) for _ in range(2)]
    self.project = nn.Dense(self.hidden_dim, dtype=self.dtype)

  def encode(self, source, *, train: bool = False):
    """``source``: clips int16 or float ``[batch, samples]`` -> ``(memory
    [batch, subsampled_frames, hidden_dim], lengths int [batch])`` (every
    frame is valid: clips have one length)."""
    if source.ndim != 2:
      raise ValueError(f"SpeechRecognizer expects audio clips [batch, samples], got "
                       f"{tuple(source.shape)}")
    x = self.front_end(source, train=train)[..., None]     # [batch, frames, mels, 1]
    for conv in self.subsample:
      x = nn.relu(conv(x))
    batch, frames = x.shape[:2]
    x = self.project(x.reshape(batch, frames, -1))
    x = x + _positions(jnp.arange(frames), self.hidden_dim).astype(x.dtype)
    x = self.dropout(x, deterministic=not train)
    lengths = jnp.full((batch,), frames, jnp.int32)
    return self.encoder(x, kv_lengths=lengths, deterministic=not train), lengths

  def __call__(self, inputs, *, train: bool = False):
    """Scores and (in evaluation) transcribes ``inputs["audio"]``.

    Args:
      inputs: ``{"audio": [batch, samples], "target": int [batch,
        target_length]}``, the target ending in ``<eos>`` then padding.
      train: dropout and SpecAugment on; the greedy transcript is skipped.

    Returns:
      ``{"logits": [batch, target_length, vocab_size]}`` (float32, teacher
      forced) and in evaluation ``"tokens"``: the cached greedy transcript
      ``[batch, target_length]``, padding after its ``<eos>``.
    """
    if not isinstance(inputs, dict) or not {"audio", "target"} <= set(inputs):
      raise ValueError(f"SpeechRecognizer expects inputs {{'audio', 'target'}}, got "
                       f"{type(inputs).__name__}")
    audio, target = inputs["audio"], inputs["target"]
    if target.ndim != 2 or target.shape[1] != self.target_length:
      raise ValueError(f"SpeechRecognizer expects target [batch, {self.target_length}], got "
                       f"{tuple(target.shape)}")
    memory, lengths = self.encode(audio, train=train)
    outputs = {"logits": self.decode(memory, lengths, shift_right(target), train=train)}
    if not train:
      outputs["tokens"] = self._greedy(memory, lengths, self.target_length)["tokens"]
      if self.is_mutable_collection("intermediates"):
        self.decode(memory, lengths, shift_right(outputs["tokens"]))
    return outputs
