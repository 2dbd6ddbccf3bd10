"""Encoder-decoder with attention: the RNN translators of Bahdanau et al. (2015)
and Luong et al. (2015).

A bidirectional RNN reads the source; an RNN decoder writes the target one
token at a time, attending over the encoder states at every step:

- ``bahdanau``: additive scores ``v^T tanh(W s_{t-1} + U h_j)`` from the
  previous decoder state; the context enters the RNN input.
- ``luong_dot`` / ``luong_general``: multiplicative scores ``s_t . h_j`` or
  ``s_t W h_j`` from the current state; the context and state make the
  "attentional" vector that predicts the token and is fed to the next step
  (input feeding).

Training uses teacher forcing (the decoder reads the true previous token);
evaluation also decodes greedily from ``<bos>``, without the target, and is
scored on that translation. The alignment ``[batch, target_length,
source_length]`` is sown as ``intermediates/alignment`` for pictures.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_lab.layers import AdditiveAttention
from attention_lab.layers import LuongAttention
from attention_lab.layers import masked_mean
from attention_lab.models.text import bidirectional_rnn
from attention_lab.models.text import rnn_cell

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SCORES = ("bahdanau", "luong_dot", "luong_general")


class DecoderStep(nn.Module):
  """One decoding step; scanned over the target positions.

  Carry: ``(state [batch, dim], feed [batch, dim], previous token [batch],
  finished [batch])``. Inputs per step: the teacher token ``[batch]`` and
  whether to read it (teacher forcing) rather than the previous prediction.
  Outputs: logits ``[batch, vocab]``, attention weights
  ``[batch, source_length]`` and the greedy token ``[batch]`` (padding once
  ``<eos>`` has been written).
  """
  vocab_size: int
  embed_dim: int
  dim: int
  score: str
  attention_units: int
  cell: str
  dtype: Any = None

  @nn.compact
  def __call__(self, carry, step_inputs, memory, memory_valid):
    state, feed, previous, finished = carry
    teacher_token, use_teacher = step_inputs
    token = jnp.where(use_teacher, teacher_token, previous)
    embedded = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                        name="token_embedding")(token)
    cell = rnn_cell(self.cell, self.dim, self.dtype, name="cell")
    if self.score == "bahdanau":
      # Attend with the state that has not yet seen this token, then update.
      context, weights = AdditiveAttention(self.attention_units, dtype=self.dtype,
                                           name="attention")(
          _hidden(state, self.cell), memory, mask=memory_valid)
      state, output = cell(state, jnp.concatenate([embedded, context], -1))
      hidden = nn.tanh(nn.Dense(self.dim, dtype=self.dtype, name="output_hidden")(
          jnp.concatenate([output, context, embedded], -1)))
    else:
      state, output = cell(state, jnp.concatenate([embedded, feed], -1))
      form = self.score.split("_", 1)[1]                  # dot or general
      context, weights = LuongAttention(form, dtype=self.dtype, name="attention")(
          output, memory, mask=memory_valid)
      hidden = nn.tanh(nn.Dense(self.dim, use_bias=False, dtype=self.dtype,
                                name="attentional")(jnp.concatenate([context, output], -1)))
      feed = hidden.astype(feed.dtype)
    # Logits in float32 whatever ``dtype``: they feed the softmax and the argmax.
    logits = nn.Dense(self.vocab_size, dtype=jnp.float32, name="output")(hidden)
    # After <eos> the decoder writes only padding: its output stops there.
    greedy = jnp.where(finished, PAD_ID, jnp.argmax(logits, -1)).astype(jnp.int32)
    finished = finished | (greedy == EOS_ID)
    return (state, feed, greedy, finished), (logits, weights, greedy)


def _hidden(state, cell: str):
  """The part of an RNN carry that attention reads (an LSTM's ``h``)."""
  return state[1] if cell == "lstm" else state


class Seq2Seq(nn.Module):
  """Bidirectional-RNN encoder, attentive RNN decoder.

  Attributes:
    vocab_size: shared source/target character vocabulary (0 pad, 1 bos, 2 eos).
    target_length: decoding steps (the longest target plus ``<eos>``).
    score: the attention score, one of ``SCORES``: ``bahdanau`` (additive),
      ``luong_dot`` or ``luong_general`` (multiplicative).
    embed_dim: character embedding width.
    hidden_dim: encoder RNN width per direction; the decoder is twice as wide
      so Luong's dot score can compare its state with the encoder's.
    attention_units: hidden width of the additive score.
    cell: ``gru`` or ``lstm``.
    dropout_rate: on the encoder states.
    dtype: compute dtype of embeddings, attention and projections (None:
      float32). The RNN states stay float32 (see ``text.rnn_cell``) and so do
      the logits.
  """
  vocab_size: int
  target_length: int
  score: str = "bahdanau"
  embed_dim: int = 32
  hidden_dim: int = 64
  attention_units: int = 64
  cell: str = "gru"
  dropout_rate: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    """Reads ``inputs["source"]``; scores and (in evaluation) translates it.

    Args:
      inputs: ``{"source": int [batch, source_length], "target": int [batch,
        target_length]}``; ``target`` ends in ``<eos>`` then padding.
      train: dropout on; the greedy translation is skipped.

    Returns:
      ``{"logits": [batch, target_length, vocab_size]}`` (float32) under
      teacher forcing (the decoder reads ``<bos>`` and the true previous
      tokens: the training loss, and the evaluation loss), and in evaluation
      also ``"tokens"``: the greedy translation ``[batch, target_length]``,
      decoded from ``<bos>`` without reading the target, padding after its
      ``<eos>``. The alignment of the translation (teacher-forced in
      training) is sown as ``intermediates/alignment``.
    """
    if self.score not in SCORES:
      raise ValueError(f"Seq2Seq: unknown score {self.score!r}; use one of {SCORES}")
    source, target = inputs["source"], inputs["target"]
    if source.ndim != 2 or target.ndim != 2 or target.shape[1] != self.target_length:
      raise ValueError(
          f"Seq2Seq expects source [batch, source_length] and target [batch, "
          f"{self.target_length}], got {tuple(source.shape)} and {tuple(target.shape)}")
    valid = source != PAD_ID
    embedded = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                        name="source_embedding")(source)
    memory = bidirectional_rnn(self.cell, self.hidden_dim, self.dtype)(
        embedded, seq_lengths=valid.sum(-1))
    memory = nn.Dropout(self.dropout_rate)(memory, deterministic=not train)
    dim = 2 * self.hidden_dim

    # The decoder starts from a summary of the whole source (masked mean); its
    # state is float32 like the encoder's, its input feed in the compute dtype.
    start = nn.tanh(nn.Dense(dim, dtype=self.dtype, name="bridge")(masked_mean(memory, valid)))
    start = start.astype(jnp.float32)
    batch, steps = source.shape[0], self.target_length
    state = (jnp.zeros_like(start), start) if self.cell == "lstm" else start
    carry = (state, jnp.zeros((batch, dim), self.dtype or jnp.float32),
             jnp.full((batch,), BOS_ID, jnp.int32), jnp.zeros((batch,), bool))
    # Teacher forcing reads <bos> then the target shifted right by one.
    teacher = jnp.concatenate([jnp.full((batch, 1), BOS_ID, target.dtype), target[:, :-1]], 1)
    teacher = teacher.astype(jnp.int32)

    decoder = nn.scan(DecoderStep, variable_broadcast="params", split_rngs={"params": False},
                      in_axes=(1, nn.broadcast, nn.broadcast), out_axes=1)(
        vocab_size=self.vocab_size, embed_dim=self.embed_dim, dim=dim,
        score=self.score, attention_units=self.attention_units, cell=self.cell,
        dtype=self.dtype, name="decoder")
    forced = jnp.ones((batch, steps), bool)
    _, (logits, alignment, _) = decoder(carry, (teacher, forced), memory, valid)
    outputs = {"logits": logits}
    if not train:
      _, (_, alignment, tokens) = decoder(carry, (teacher, ~forced), memory, valid)
      outputs["tokens"] = tokens
    self.sow("intermediates", "alignment", alignment)
    return outputs


def strip_at_eos(ids) -> list:
  """Token ids up to (not including) the first ``<eos>``; padding and
  ``<bos>`` dropped."""
  out = []
  for i in jax.device_get(ids).tolist():
    if i == EOS_ID:
      break
    if i not in (PAD_ID, BOS_ID):
      out.append(i)
  return out
