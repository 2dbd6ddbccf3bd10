"""Transformer encoder-decoder (Vaswani et al., 2017) with key/value-cached
incremental decoding.

The encoder is ``layers.Encoder`` (pre-LN blocks); each decoder block is

    y = y + CausalSelfAttention(LN(y))
    y = y + CrossAttention(LN(y), encoder output)     # source padding: kv_lengths
    y = y + MLP(LN(y))

Training reads the target shifted right (teacher forcing) and runs every
position at once under a causal mask. Generation writes one token per step:
each self-attention layer keeps a cache of the keys and values of the tokens
written so far, ``[batch, max_length, heads, head_dim]`` of fixed shape,
filled one row per step inside a ``scan``, so a step costs one token's
projections plus attention over the cache, instead of a pass over the whole
prefix. ``generate`` is greedy, ``generate_beam`` beam search on the same
cache; ``generate_by_recompute`` is the slower pass, kept as the reference
the cache is tested and benchmarked against.

Evaluation (``train=False``) returns the greedy translation decoded from
``<bos>`` without reading the target. When ``intermediates`` are mutable the
decoder is run once more over its own translation, so the cross-attention
weights sown last (``decoder_block_i/cross_attention/attention_weights``,
``[batch, heads, target_length, source_length]``) are those of the
translation the model wrote, not of the reference target.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_lab import kernels
from attention_lab.layers import AttentionConfig
from attention_lab.layers import CrossAttention
from attention_lab.layers import Encoder
from attention_lab.layers import MlpBlock

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

Cache = Dict[str, jax.Array]   # {"key", "value"}: [batch, max_length, heads, head_dim]

# AttentionConfig fields the cached decoder self-attention carries out; the
# others (windows, mods, rotary, qk-norm, grouped K/V) would each need their
# incremental form too.
DECODER_ATTENTION_FIELDS = ("kernel", "dropout_rate", "options")


def decoder_attention_problems(config: AttentionConfig) -> List[Tuple[str, str]]:
  """``(field, why)`` for each ``AttentionConfig`` setting the decoder lacks."""
  default = AttentionConfig()
  return [(field.name, f"is not supported by the cached decoder; it takes "
                       f"{', '.join(DECODER_ATTENTION_FIELDS)}")
          for field in dataclasses.fields(AttentionConfig)
          if field.name not in DECODER_ATTENTION_FIELDS
          and getattr(config, field.name) != getattr(default, field.name)]


def check_decoder_attention(config: AttentionConfig) -> None:
  """Raises ValueError naming an ``AttentionConfig`` setting the decoder lacks."""
  for field, why in decoder_attention_problems(config)[:1]:
    raise ValueError(f"TransformerSeq2Seq: attention.{field}={getattr(config, field)!r} {why}")


class CausalSelfAttention(nn.Module):
  """Causal multi-head self-attention with an incremental (cached) form.

  Parameters are named and shaped as in ``layers.MultiHeadAttention``
  (``query``, ``key``, ``value``: ``[features, heads, head_dim]``; ``out``),
  and the math goes through ``kernels.dot_product_attention`` in both forms:
  ``is_causal=True`` over a whole sequence, ``kv_lengths`` (the filled part
  of the cache) for one new token. ``attention`` gives the kernel, the
  attention dropout (training only) and kernel options.
  """
  num_heads: int
  features: int
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = None

  def setup(self):
    if self.features % self.num_heads:
      raise ValueError(f"CausalSelfAttention: features {self.features} is not divisible "
                       f"by num_heads {self.num_heads}")
    head_dim = self.features // self.num_heads
    project = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                           name=name)
    self.query, self.key, self.value = project("query"), project("key"), project("value")
    self.out = nn.DenseGeneral(self.features, axis=(-2, -1), dtype=self.dtype, name="out")

  def __call__(self, x, *, deterministic: bool = True):
    """``x [batch, length, features]`` -> same shape, position ``t`` seeing ``<= t``.

    Sows ``attention_weights`` ``[batch, heads, length, length]`` when
    ``intermediates`` are mutable.
    """
    query, key, value = self.query(x), self.key(x), self.value(x)
    rate = self.attention.dropout_rate
    use_dropout = rate > 0.0 and not deterministic
    out = kernels.dot_product_attention(
        query, key, value, is_causal=True, implementation=self.attention.kernel,
        dropout_rate=rate if use_dropout else 0.0,
        dropout_rng=self.make_rng("dropout") if use_dropout else None,
        deterministic=not use_dropout, **dict(self.attention.options))
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "attention_weights",
               kernels.attention_weights(query, key, is_causal=True))
    return self.out(out)

  def step(self, x, cache: Cache, position):
    """One new token at ``position``: ``x [batch, 1, features]``.

    Writes its key and value into row ``position`` of ``cache`` and attends
    over rows ``0..position`` (``kv_lengths = position + 1``: the rows not yet
    written are hidden as padding, which is what causality means here).

    Returns:
      ``([batch, 1, features], the updated cache)``.
    """
    query, key, value = self.query(x), self.key(x), self.value(x)
    cache = {
        "key": jax.lax.dynamic_update_slice_in_dim(
            cache["key"], key.astype(cache["key"].dtype), position, axis=1),
        "value": jax.lax.dynamic_update_slice_in_dim(
            cache["value"], value.astype(cache["value"].dtype), position, axis=1),
    }
    filled = jnp.full(x.shape[:1], position + 1, jnp.int32)
    out = kernels.dot_product_attention(
        query, cache["key"].astype(query.dtype), cache["value"].astype(query.dtype),
        kv_lengths=filled, implementation=self.attention.kernel,
        **dict(self.attention.options))
    return self.out(out), cache


class DecoderBlock(nn.Module):
  """Pre-LN decoder block: causal self-attention, cross-attention, MLP."""
  num_heads: int
  features: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = None

  def setup(self):
    self.self_norm = nn.LayerNorm(dtype=self.dtype)
    self.self_attention = CausalSelfAttention(
        self.num_heads, self.features, self.attention, dtype=self.dtype)
    self.cross_norm = nn.LayerNorm(dtype=self.dtype)
    self.cross_attention = CrossAttention(
        num_heads=self.num_heads, attention=self.attention, dtype=self.dtype)
    self.mlp_norm = nn.LayerNorm(dtype=self.dtype)
    self.mlp = MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def _cross_and_mlp(self, y, memory, source_lengths, deterministic):
    attended = self.cross_attention(self.cross_norm(y), memory, kv_lengths=source_lengths,
                                    deterministic=deterministic)
    y = y + self.dropout(attended, deterministic=deterministic)
    return y + self.mlp(self.mlp_norm(y), deterministic=deterministic)

  def __call__(self, y, memory, source_lengths, *, deterministic: bool = True):
    """``y [batch, target_length, features]``, ``memory [batch, source_length,
    features]``, ``source_lengths`` int ``[batch]`` -> ``y``'s shape."""
    attended = self.self_attention(self.self_norm(y), deterministic=deterministic)
    y = y + self.dropout(attended, deterministic=deterministic)
    return self._cross_and_mlp(y, memory, source_lengths, deterministic)

  def step(self, y, memory, source_lengths, cache: Cache, position):
    """One token ``y [batch, 1, features]`` -> ``(same shape, updated cache)``."""
    attended, cache = self.self_attention.step(self.self_norm(y), cache, position)
    return self._cross_and_mlp(y + attended, memory, source_lengths, True), cache


class TransformerSeq2Seq(nn.Module):
  """Transformer encoder-decoder over a shared character vocabulary.

  Attributes:
    vocab_size: source and target vocabulary (0 pad, 1 bos, 2 eos).
    target_length: decoding steps (the longest target plus ``<eos>``).
    num_layers: encoder blocks, and decoder blocks.
    num_heads: attention heads in every attention layer.
    hidden_dim: model width; divisible by ``num_heads``.
    mlp_dim: hidden width of each block's MLP.
    dropout_rate: on embeddings and residual branches.
    attention: ``AttentionConfig`` of every attention layer (from
      ``config.model.attention``): kernel (None: dispatch's choice per
      platform), attention dropout and kernel options; the cached decoder
      takes no other setting (``check_decoder_attention``).
    dtype: compute dtype (None: float32); logits are float32.
  """
  vocab_size: int
  target_length: int
  num_layers: int = 2
  num_heads: int = 4
  hidden_dim: int = 128
  mlp_dim: int = 256
  dropout_rate: float = 0.0
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = None
  # The config validator asks the model which attention settings it refuses.
  attention_problems = staticmethod(decoder_attention_problems)

  def setup(self):
    check_decoder_attention(self.attention)
    self.source_embedding = nn.Embed(self.vocab_size, self.hidden_dim, dtype=self.dtype)
    self.target_embedding = nn.Embed(self.vocab_size, self.hidden_dim, dtype=self.dtype)
    self.encoder = Encoder(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate, attention=self.attention, dtype=self.dtype)
    self.decoder = [DecoderBlock(
        self.num_heads, self.hidden_dim, self.mlp_dim, self.dropout_rate, self.attention,
        self.dtype, name=f"decoder_block_{i}") for i in range(self.num_layers)]
    self.decoder_norm = nn.LayerNorm(dtype=self.dtype)
    # Logits in float32 whatever ``dtype``: they feed the softmax and the argmax.
    self.output = nn.Dense(self.vocab_size, dtype=jnp.float32)
    self.dropout = nn.Dropout(self.dropout_rate)

  def _embed(self, embedding, ids, positions):
    """``ids [batch, length]`` at ``positions [length]`` -> ``[batch, length,
    hidden_dim]``: scaled token embedding plus the sinusoidal position code."""
    x = embedding(ids) * jnp.sqrt(float(self.hidden_dim)).astype(self.dtype or jnp.float32)
    return x + _positions(positions, self.hidden_dim).astype(x.dtype)

  def encode(self, source, *, train: bool = False):
    """``source`` int ``[batch, source_length]`` (trailing padding) ->
    ``(memory [batch, source_length, hidden_dim], lengths int [batch])``."""
    lengths = (source != PAD_ID).sum(-1).astype(jnp.int32)
    x = self._embed(self.source_embedding, source, jnp.arange(source.shape[1]))
    x = self.dropout(x, deterministic=not train)
    memory = self.encoder(x, kv_lengths=lengths, deterministic=not train)
    return memory, lengths

  def decode(self, memory, source_lengths, tokens, *, train: bool = False):
    """Teacher-forced decoder: ``tokens [batch, length]`` (``<bos>`` first)
    -> logits ``[batch, length, vocab_size]``, position ``t`` predicting token
    ``t + 1`` from tokens ``<= t``."""
    y = self._embed(self.target_embedding, tokens, jnp.arange(tokens.shape[1]))
    y = self.dropout(y, deterministic=not train)
    for block in self.decoder:
      y = block(y, memory, source_lengths, deterministic=not train)
    return self.output(self.decoder_norm(y))

  def init_cache(self, batch: int, max_length: int):
    """Zeros for every decoder layer's keys and values:
    ``[{"key", "value": [batch, max_length, heads, head_dim]}] * num_layers``."""
    shape = (batch, max_length, self.num_heads, self.hidden_dim // self.num_heads)
    dtype = self.dtype or jnp.float32
    return [{"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
            for _ in range(self.num_layers)]

  def decode_step(self, memory, source_lengths, token, position, cache):
    """One cached step: ``token`` int ``[batch]`` at ``position`` (a scalar)
    -> ``(logits [batch, vocab_size], updated cache)``."""
    y = self._embed(self.target_embedding, token[:, None], jnp.reshape(position, (1,)))
    new_cache = []
    for block, layer_cache in zip(self.decoder, cache):
      y, layer_cache = block.step(y, memory, source_lengths, layer_cache, position)
      new_cache.append(layer_cache)
    return self.output(self.decoder_norm(y))[:, 0], new_cache

  def generate(self, source, steps: Optional[int] = None):
    """Greedy decoding with the key/value cache.

    Args:
      source: int ``[batch, source_length]``.
      steps: tokens to write (default ``target_length``); the cache has this
        many rows.

    Returns:
      ``{"tokens": int [batch, steps]`` (padding after the first ``<eos>``),
      ``"logits": [batch, steps, vocab_size]}``.
    """
    return self._greedy(*self.encode(source), steps or self.target_length)

  def _greedy(self, memory, lengths, steps: int):
    """``generate`` from the encoder's output."""
    batch = memory.shape[0]

    def step(model, carry, position):
      token, cache, finished = carry
      logits, cache = model.decode_step(memory, lengths, token, position, cache)
      token, finished = _next_token(logits, finished)
      return (token, cache, finished), (logits, token)

    carry = (jnp.full((batch,), BOS_ID, jnp.int32), self.init_cache(batch, steps),
             jnp.zeros((batch,), bool))
    _, (logits, tokens) = _scan(step, self, carry, jnp.arange(steps))
    return {"tokens": tokens.T, "logits": jnp.swapaxes(logits, 0, 1)}

  def generate_beam(self, source, beam_size: int = 4, steps: Optional[int] = None):
    """Beam search with the key/value cache: the ``beam_size`` best partial
    translations by summed log-probability survive each step.

    A beam that has written ``<eos>`` can only go on with padding at no cost,
    so finished and unfinished translations compete on their total
    log-probability (no length normalisation). Each beam keeps its own cache
    rows, reordered with the beams every step.

    Args:
      source: int ``[batch, source_length]``.
      beam_size: beams per source (1 is greedy decoding).
      steps: tokens to write (default ``target_length``).

    Returns:
      ``{"tokens": int [batch, steps]`` (the best beam, padding after its
      ``<eos>``), ``"beams": int [batch, beam_size, steps]`` (best first),
      ``"scores": [batch, beam_size]`` (their log-probabilities)}``.
    """
    if beam_size < 1:
      raise ValueError(f"generate_beam: beam_size must be at least 1, got {beam_size}")
    steps = steps or self.target_length
    memory, lengths = self.encode(source)
    batch, k = source.shape[0], beam_size
    # Every beam of a source reads the same encoder output: [batch * k, ...].
    memory, lengths = (jnp.repeat(x, k, axis=0) for x in (memory, lengths))

    def step(model, carry, position):
      token, cache, scores, finished, written = carry
      logits, cache = model.decode_step(memory, lengths, token, position, cache)
      log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, -1)
      vocab = log_probs.shape[-1]
      only_padding = jnp.full((vocab,), -jnp.inf).at[PAD_ID].set(0.0)
      log_probs = jnp.where(finished[..., None], only_padding, log_probs)
      candidates = (scores[..., None] + log_probs).reshape(batch, k * vocab)
      scores, chosen = jax.lax.top_k(candidates, k)                 # [batch, k]
      parent, token = chosen // vocab, (chosen % vocab).astype(jnp.int32)
      rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)   # into [batch * k]
      cache = jax.tree_util.tree_map(lambda x: x[rows], cache)
      finished = jnp.take_along_axis(finished, parent, 1) | (token == EOS_ID)
      written = jnp.take_along_axis(written, parent[..., None], 1)
      written = jax.lax.dynamic_update_slice_in_dim(written, token[..., None], position, axis=2)
      return (token.reshape(-1), cache, scores, finished, written), None

    # Only the first beam is live at the start: the others would repeat it.
    scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf) * jnp.ones((batch, 1))
    carry = (jnp.full((batch * k,), BOS_ID, jnp.int32), self.init_cache(batch * k, steps),
             scores, jnp.zeros((batch, k), bool), jnp.zeros((batch, k, steps), jnp.int32))
    (_, _, scores, _, written), _ = _scan(step, self, carry, jnp.arange(steps))
    # top_k keeps each step's beams sorted, best first.
    return {"tokens": written[:, 0], "beams": written, "scores": scores}

  def generate_by_recompute(self, source, steps: Optional[int] = None):
    """Greedy decoding without a cache: step ``t`` runs the whole decoder over
    the ``steps`` positions written so far (later ones are padding the causal
    mask hides) and reads position ``t``. Same returns as ``generate``; each
    step costs a full decoder pass, so the run costs ``O(steps^2)`` tokens."""
    memory, lengths = self.encode(source)
    steps = steps or self.target_length
    batch = source.shape[0]

    def step(model, carry, position):
      written, finished = carry                               # written: [batch, steps]
      logits = model.decode(memory, lengths, written)
      logits = jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False)
      token, finished = _next_token(logits, finished)
      written = jax.lax.dynamic_update_slice_in_dim(
          written, token[:, None], jnp.minimum(position + 1, steps - 1), axis=1)
      return (written, finished), (logits, token)

    written = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(BOS_ID)
    _, (logits, tokens) = _scan(step, self, (written, jnp.zeros((batch,), bool)),
                                jnp.arange(steps))
    return {"tokens": tokens.T, "logits": jnp.swapaxes(logits, 0, 1)}

  def __call__(self, inputs, *, train: bool = False):
    """Scores and (in evaluation) translates ``inputs["source"]``.

    Args:
      inputs: ``{"source": int [batch, source_length], "target": int [batch,
        target_length]}``; ``target`` ends in ``<eos>`` then padding.
      train: dropout on; the greedy translation is skipped.

    Returns:
      ``{"logits": [batch, target_length, vocab_size]}`` (float32, teacher
      forced: the loss) and in evaluation ``"tokens"``: the cached greedy
      translation ``[batch, target_length]``, padding after its ``<eos>``.
    """
    source, target = inputs["source"], inputs["target"]
    if source.ndim != 2 or target.ndim != 2 or target.shape[1] != self.target_length:
      raise ValueError(
          f"TransformerSeq2Seq expects source [batch, source_length] and target [batch, "
          f"{self.target_length}], got {tuple(source.shape)} and {tuple(target.shape)}")
    memory, lengths = self.encode(source, train=train)
    outputs = {"logits": self.decode(memory, lengths, shift_right(target), train=train)}
    if not train:
      outputs["tokens"] = self._greedy(memory, lengths, self.target_length)["tokens"]
      if self.is_mutable_collection("intermediates"):
        # Sown last: the attention of the translation the model wrote.
        self.decode(memory, lengths, shift_right(outputs["tokens"]))
    return outputs


def shift_right(tokens):
  """``<bos>`` then ``tokens [batch, length]`` without its last column."""
  bos = jnp.full((tokens.shape[0], 1), BOS_ID, jnp.int32)
  return jnp.concatenate([bos, tokens[:, :-1].astype(jnp.int32)], axis=1)


def _positions(positions, features: int):
  """Sinusoidal codes ``[len(positions), features]`` of (possibly traced)
  integer positions: the rows of ``layers.sinusoidal_positions``' table,
  computed per position so a decoding step can ask for its own row."""
  half = jnp.arange(0, features, 2, dtype=jnp.float32)
  angle = positions.astype(jnp.float32)[:, None] * jnp.exp(half * (-jnp.log(1e4) / features))
  codes = jnp.zeros((positions.shape[0], features), jnp.float32)
  codes = codes.at[:, 0::2].set(jnp.sin(angle))
  return codes.at[:, 1::2].set(jnp.cos(angle)[:, :features // 2])


def _next_token(logits, finished):
  """Greedy choice; after ``<eos>`` only padding is written."""
  token = jnp.where(finished, PAD_ID, jnp.argmax(logits, -1)).astype(jnp.int32)
  return token, finished | (token == EOS_ID)


def _scan(step, module, carry, xs):
  """``nn.scan`` of ``step(module, carry, x)`` over ``xs`` with the
  parameters shared across steps (intermediates are not collected inside:
  pictures come from the teacher-forced pass)."""
  return nn.scan(step, variable_broadcast="params", split_rngs={"params": False})(
      module, carry, xs)
