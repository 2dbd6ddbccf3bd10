"""Image captioning with attention over a grid of regions ("Show, Attend and
Tell", Xu et al. 2015), and a Transformer decoder over the same grid.

A CNN (``RegionEncoder``) turns the image into ``grid x grid`` region
features ``a_i`` ``[batch, regions, features]`` (with a learned embedding of
each region's place). Two decoders write the caption from them:

- ``ShowAttendTell``: an LSTM that, at each word, attends over the regions
  with additive (Bahdanau) soft attention from its previous state and reads
  the context with the previous word; its word step is ``seq2seq.DecoderStep``
  (the RNN translator's Bahdanau step: attend, LSTM update, deep output
  ``tanh(W [h, z, E y])``). The LSTM starts from MLPs of the mean region, as
  in the paper. Training adds the doubly stochastic attention regulariser
  ``lambda * sum_i (1 - sum_t alpha_ti)^2`` (``doubly_stochastic_penalty``),
  which asks every region to be looked at about once over the caption. The
  paper's gating scalar beta on the context is left out.
- ``TransformerCaptioner``: ``TransformerSeq2Seq`` with the region features
  (through its Transformer encoder) in place of an embedded source, so its
  key/value-cached greedy and beam decoding serve captions unchanged.

Evaluation (``train=False``) returns the greedy caption, decoded from
``<bos>`` without reading the target; the LSTM sows the attention of that
caption as ``intermediates/alignment`` ``[batch, caption_length, regions]``,
the Transformer its cross-attention over regions per layer (as in
translation, from a pass over its own caption).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.layers import LearnedPositionEmbedding
from attention_lab.models.seq2seq import BOS_ID
from attention_lab.models.seq2seq import DecoderStep
from attention_lab.models.seq2seq import PAD_ID
from attention_lab.models.transformer_seq2seq import TransformerSeq2Seq
from attention_lab.models.transformer_seq2seq import shift_right


def doubly_stochastic_penalty(weights, target_mask):
  """``sum_i (1 - sum_t alpha_ti)^2`` per caption (Xu et al. 2015, eq. 14).

  Args:
    weights: attention ``alpha`` ``[batch, steps, regions]`` (each step sums
      to 1 over regions).
    target_mask: bool ``[batch, steps]``, True at the caption's words and its
      ``<eos>``; the steps after it do not count.

  Returns:
    float32 ``[batch]``.
  """
  if weights.ndim != 3 or target_mask.shape != weights.shape[:2]:
    raise ValueError(f"doubly_stochastic_penalty: weights [batch, steps, regions] and mask "
                     f"[batch, steps], got {weights.shape} and {target_mask.shape}")
  coverage = jnp.einsum("btr,bt->br", weights.astype(jnp.float32),
                        target_mask.astype(jnp.float32))
  return jnp.sum(jnp.square(1.0 - coverage), axis=-1)


class RegionEncoder(nn.Module):
  """CNN: ``images [batch, height, width, channels]`` -> region features
  ``[batch, (height / 2^stages) * (width / 2^stages), features]``, row-major
  over the grid, each region plus a learned embedding of its place.

  Each stage is a stride-2 3x3 convolution then a 3x3 convolution (ReLU
  after each; halving first costs a third of the time of convolving at full
  size first, measured on CPU); a last 3x3 convolution on the grid widens
  every region's view to its neighbours (a large digit spans several
  regions).

  Attributes:
    widths: channels per stage; ``len(widths)`` halvings.
    features: width of a region feature.
  """
  widths: Sequence[int] = (16, 32, 64)
  features: int = 128
  dtype: Any = None

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4:
      raise ValueError(f"RegionEncoder expects images [batch, height, width, channels], "
                       f"got {images.shape}")
    scale = 2 ** len(self.widths)
    if images.shape[1] % scale or images.shape[2] % scale:
      raise ValueError(f"RegionEncoder: image size {images.shape[1]}x{images.shape[2]} is "
                       f"not divisible by 2^{len(self.widths)} (one halving per width)")
    x = images.astype(self.dtype or jnp.float32)
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), dtype=self.dtype,
                          name=f"down_{i}")(x))
      x = nn.relu(nn.Conv(width, (3, 3), dtype=self.dtype, name=f"conv_{i}")(x))
    x = nn.relu(nn.Conv(self.features, (3, 3), dtype=self.dtype, name="grid_conv")(x))
    x = x.reshape(x.shape[0], -1, self.features)
    return LearnedPositionEmbedding(name="region_position")(x)


def _check_inputs(name: str, inputs, target_length: int):
  if not isinstance(inputs, dict) or not {"image", "target"} <= set(inputs):
    raise ValueError(f"{name} expects inputs {{'image', 'target'}}, got "
                     f"{type(inputs).__name__}")
  image, target = inputs["image"], inputs["target"]
  if image.ndim != 4 or target.ndim != 2 or target.shape[1] != target_length:
    raise ValueError(f"{name} expects image [batch, height, width, channels] and target "
                     f"[batch, {target_length}], got {tuple(image.shape)} and "
                     f"{tuple(target.shape)}")
  return image, target


class ShowAttendTell(nn.Module):
  """CNN regions, LSTM decoder with additive soft attention over them.

  Attributes:
    vocab_size: word vocabulary (0 pad, 1 bos, 2 eos).
    target_length: decoding steps (the longest caption plus ``<eos>``).
    widths, features: the ``RegionEncoder``.
    embed_dim: word embedding width.
    hidden_dim: LSTM width.
    attention_units: hidden width of the additive score.
    doubly_stochastic: lambda of the attention regulariser (the paper's is 1).
      Added to the loss per caption word: the paper's per-caption loss
      divided by the caption length, the scale of the token-mean
      cross-entropy. 0: none.
    dropout_rate: on the region features.
    dtype: compute dtype (None: float32); the LSTM state and logits stay float32.
  """
  vocab_size: int
  target_length: int
  widths: Sequence[int] = (16, 32, 64)
  features: int = 128
  embed_dim: int = 64
  hidden_dim: int = 256
  attention_units: int = 64
  doubly_stochastic: float = 1.0
  dropout_rate: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    """Scores and (in evaluation) captions ``inputs["image"]``.

    Args:
      inputs: ``{"image": [batch, height, width, channels], "target": int
        [batch, target_length]}``, the target ending in ``<eos>`` then padding.
      train: dropout on; the greedy caption is skipped.

    Returns:
      ``{"logits": [batch, target_length, vocab_size]}`` (float32, teacher
      forced), in training ``"attention_penalty"``: lambda times the
      regulariser summed over the batch over its caption tokens (a scalar),
      and in evaluation ``"tokens"``: the greedy caption ``[batch,
      target_length]``, padding after its ``<eos>``.
    """
    image, target = _check_inputs("ShowAttendTell", inputs, self.target_length)
    regions = RegionEncoder(self.widths, self.features, self.dtype, name="regions")(image)
    regions = nn.Dropout(self.dropout_rate)(regions, deterministic=not train)
    batch, steps = image.shape[0], self.target_length
    mean = regions.mean(axis=1)
    # The paper's f_init: the first memory and state from the mean region.
    start = lambda name: nn.tanh(nn.Dense(self.hidden_dim, dtype=self.dtype, name=name)(
        mean)).astype(jnp.float32)
    state = (start("init_c"), start("init_h"))          # OptimizedLSTMCell carries (c, h)
    carry = (state, jnp.zeros((batch, self.hidden_dim), self.dtype or jnp.float32),
             jnp.full((batch,), BOS_ID, jnp.int32), jnp.zeros((batch,), bool))
    teacher = shift_right(target)
    every_region = jnp.ones(regions.shape[:2], bool)
    decoder = nn.scan(DecoderStep, variable_broadcast="params", split_rngs={"params": False},
                      in_axes=(1, nn.broadcast, nn.broadcast), out_axes=1)(
        vocab_size=self.vocab_size, embed_dim=self.embed_dim, dim=self.hidden_dim,
        score="bahdanau", attention_units=self.attention_units, cell="lstm",
        dtype=self.dtype, name="decoder")
    forced = jnp.ones((batch, steps), bool)
    _, (logits, alignment, _) = decoder(carry, (teacher, forced), regions, every_region)
    outputs = {"logits": logits}
    if train:
      mask = target != PAD_ID
      penalty = doubly_stochastic_penalty(alignment, mask).sum()
      outputs["attention_penalty"] = (self.doubly_stochastic * penalty
                                      / jnp.maximum(mask.sum(), 1).astype(jnp.float32))
    else:
      _, (_, alignment, tokens) = decoder(carry, (teacher, ~forced), regions, every_region)
      outputs["tokens"] = tokens
    self.sow("intermediates", "alignment", alignment)
    return outputs


class TransformerCaptioner(TransformerSeq2Seq):
  """``TransformerSeq2Seq`` over the ``RegionEncoder``'s grid: the regions
  (projected to ``hidden_dim``) go through its Transformer encoder and its
  decoder cross-attends to them; ``generate`` and ``generate_beam`` take an
  image batch ``[batch, height, width, channels]`` as their source.

  Attributes (besides ``TransformerSeq2Seq``'s):
    widths: the ``RegionEncoder``'s stages (its features are ``hidden_dim``).
  """
  widths: Sequence[int] = (16, 32, 64)

  def setup(self):
    super().setup()
    self.regions = RegionEncoder(self.widths, self.hidden_dim, self.dtype)

  def encode(self, source, *, train: bool = False):
    """``source``: images ``[batch, height, width, channels]`` ->
    ``(memory [batch, regions, hidden_dim], lengths int [batch])`` (every
    region is valid)."""
    x = self.dropout(self.regions(source), deterministic=not train)
    lengths = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
    return self.encoder(x, kv_lengths=lengths, deterministic=not train), lengths

  def __call__(self, inputs, *, train: bool = False):
    """``ShowAttendTell``'s inputs and outputs (no attention penalty); the
    cross-attention of the greedy caption is sown last, as in translation."""
    image, target = _check_inputs("TransformerCaptioner", inputs, self.target_length)
    memory, lengths = self.encode(image, train=train)
    outputs = {"logits": self.decode(memory, lengths, shift_right(target), train=train)}
    if not train:
      outputs["tokens"] = self._greedy(memory, lengths, self.target_length)["tokens"]
      if self.is_mutable_collection("intermediates"):
        self.decode(memory, lengths, shift_right(outputs["tokens"]))
    return outputs
