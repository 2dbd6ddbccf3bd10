"""Multi-head attention modules: parameters here, math in ``attention_lab.kernels``.

Parameter names (``query``, ``key``, ``value``, ``out``) and layouts match
``flax.linen.MultiHeadDotProductAttention``, so weights move between the two.
Every attention setting a model takes from its config travels as one
``AttentionConfig`` (``config.model.attention``), from the config through the
models and blocks to the kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention_lab import kernels
from attention_lab.kernels import masks
from attention_lab.kernels import mods
from attention_lab.layers import rotary as rotary_lib

ROTARY = (None, "1d", "2d")


def _frozen(args) -> Tuple[Tuple[str, Any], ...]:
  """A mapping (dict, ConfigDict, pairs) as sorted ``(key, value)`` pairs,
  lists made tuples, so the config is hashable as Flax module fields are."""
  if not args:
    return ()
  items = args.items() if hasattr(args, "items") else args
  return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items))


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Every setting of a model's attention, as one object.

  Attributes:
    kernel: registry name or per-platform pin (``"cpu=blockwise"``), or None
      for each platform's automatic choice.
    dropout_rate: dropout on the attention weights (in the fused kernels).
    window: ``w`` or ``(left, right)`` local band, or None.
    score_mod: a registered mod name (``kernels.mods.names()``) applied to
      the logits: ``"alibi"`` (args ``learned``, ``symmetric``),
      ``"relative_bias"`` (a learned table per head and clipped distance,
      arg ``max_distance``), ``"softcap"`` (arg ``cap``), or a researcher's
      own (``mods.register``), built as ``factory(**score_mod_args)``.
    score_mod_args: keyword arguments of the score_mod, as pairs or a dict.
    mask_mod / mask_mod_args: the same for a registered mask (``"prefix_lm"``
      with ``prefix_length``, ``"sliding_window"`` with ``window``, ...).
    rotary: rotary position embeddings on queries and keys of
      self-attention: None, ``"1d"`` (sequence positions) or ``"2d"``
      (patch rows and columns; the model passes them).
    rotary_base: the rotary frequencies' base.
    qk_norm: RMS-normalise queries and keys per head before the scores.
    sinks: a learned logit per head that every query also attends to, with
      a zero value ("attention sinks"): a query may put weight on nothing.
      Computed from the kernel's log-sum-exp, so any kernel with a residual
      runs it fused.
    num_kv_heads: K/V heads for grouped-query (or, at 1, multi-query)
      attention; None = one per query head. Kernels take the grouped K/V
      without repeating it.
    options: kernel options passed to the kernel (``block_q``, ...), as pairs.
  """
  kernel: Optional[str] = None
  dropout_rate: float = 0.0
  window: Any = None
  score_mod: Optional[str] = None
  score_mod_args: Tuple[Tuple[str, Any], ...] = ()
  mask_mod: Optional[str] = None
  mask_mod_args: Tuple[Tuple[str, Any], ...] = ()
  rotary: Optional[str] = None
  rotary_base: float = 10000.0
  qk_norm: bool = False
  sinks: bool = False
  num_kv_heads: Optional[int] = None
  options: Tuple[Tuple[str, Any], ...] = ()

  def __post_init__(self):
    # Frozen: normalise through object.__setattr__ (lists from configs to
    # tuples, mappings to sorted pairs) so equal settings hash equal.
    if isinstance(self.window, list):
      object.__setattr__(self, "window", tuple(self.window))
    # NumPy integers from a config become ints: the kernels check for int.
    as_int = lambda w: int(w) if isinstance(w, np.integer) else w
    if isinstance(self.window, tuple):
      object.__setattr__(self, "window", tuple(as_int(w) for w in self.window))
    else:
      object.__setattr__(self, "window", as_int(self.window))
    for name in ("score_mod_args", "mask_mod_args", "options"):
      object.__setattr__(self, name, _frozen(getattr(self, name)))
    for problem in self.problems():
      raise ValueError(f"AttentionConfig: {problem}")

  def problems(self):
    """One line per invalid field (the config validator reports them all)."""
    found = []
    if not 0.0 <= float(self.dropout_rate) < 1.0:
      found.append(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.rotary not in ROTARY:
      found.append(f"rotary must be one of None, '1d', '2d', got {self.rotary!r}")
    if self.num_kv_heads is not None and int(self.num_kv_heads) <= 0:
      found.append(f"num_kv_heads must be positive, got {self.num_kv_heads}")
    if self.window is not None and not _is_window(self.window):
      found.append(f"window must be a number of keys w >= 0 (each side) or a pair "
                   f"(left, right) of them, got {self.window!r}")
    for hook, name, args in (("score_mod", self.score_mod, self.score_mod_args),
                             ("mask_mod", self.mask_mod, self.mask_mod_args)):
      if name is None:
        continue
      try:
        kind = mods.kind(name)
      except ValueError as e:
        found.append(f"{hook}: {e}")
        continue
      if kind != hook:
        found.append(f"{hook} {name!r} is a {kind}; set it as attention.{kind}")
        continue
      problem = _mod_args_problem(name, dict(args))
      if problem:
        found.append(f"{hook}_args for {name}: {problem}")
    if self.kernel is not None:
      try:
        kernels.registry.parse_choice(self.kernel)
      except ValueError as e:
        found.append(f"kernel: {e}")
    return found

  @classmethod
  def from_config(cls, config) -> "AttentionConfig":
    """From ``config.model.attention`` (a ConfigDict or dict; None: defaults).
    Unknown keys are a ValueError naming them and the known ones."""
    if config is None:
      return cls()
    if isinstance(config, cls):
      return config
    fields = dict(config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"attention config has no field(s) {unknown}; "
                       f"its fields: {', '.join(sorted(known))}")
    return cls(**fields)


def _is_window(window) -> bool:
  """``w`` or ``(left, right)``, each an integer >= 0 (what ``masks`` takes)."""
  sides = window if isinstance(window, tuple) else (window,)
  return (len(sides) in (1, 2) and (len(sides) == 2 or not isinstance(window, tuple))
          and all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in sides))


def _mod_args_problem(name: str, args: Dict[str, Any]) -> Optional[str]:
  """Why ``args`` cannot build mod ``name`` (a missing or unknown keyword), or
  None. A layer-built mod (``LAYER_MODS``) gets its module, heads and causal
  flag from the layer; the config gives only the rest."""
  import inspect
  layer_built = name in LAYER_MODS
  factory = LAYER_MODS[name] if layer_built else mods.get(name)
  signature = inspect.signature(factory)
  try:
    if layer_built:
      signature.bind(None, 1, False, **args)
    else:
      signature.bind(**args)
  except TypeError as e:
    params = list(signature.parameters.values())[3 if layer_built else 0:]
    takes = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                      for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return f"{e}; {name} takes ({takes or 'nothing'})"
  return None


def _alibi(module, heads, is_causal, learned=False, symmetric=None):
  """ALiBi slopes: the paper's fixed ones, or a parameter started there."""
  slopes = mods.alibi_slopes(heads)
  if learned:
    slopes = module.param("alibi_slopes", lambda _: jnp.asarray(slopes))
  return mods.alibi(slopes, symmetric=(not is_causal) if symmetric is None else symmetric)


def _relative_bias(module, heads, is_causal, max_distance=32):
  """A learned bias per head and clipped distance (zeros at the start)."""
  del is_causal
  table = module.param("relative_bias", nn.initializers.zeros, (heads, 2 * max_distance + 1))
  return mods.relative_bias(table, max_distance)


def _t5_relative_bias(module, heads, is_causal, num_buckets=32, max_distance=128):
  """T5's learned bias per head and log-spaced distance bucket (zeros at the
  start); bidirectional unless the layer is causal."""
  table = module.param("t5_relative_bias", nn.initializers.zeros, (heads, num_buckets))
  return mods.t5_relative_bias(table, bidirectional=not is_causal, max_distance=max_distance)


# Mods whose state lives in the layer: built from (module, heads, is_causal,
# **args). Every other registered mod is ``factory(**args)``.
LAYER_MODS: Dict[str, Callable] = {"alibi": _alibi, "relative_bias": _relative_bias,
                                   "t5_relative_bias": _t5_relative_bias}


class MultiHeadAttention(nn.Module):
  """Multi-head scaled dot-product attention through a registered kernel.

  Attributes:
    num_heads: number of query heads; ``qkv_features`` must divide by it.
    qkv_features: width of the projections (default: the query input width).
    out_features: output width (default: the query input width).
    attention: an ``AttentionConfig``: kernel, dropout, window, mods,
      rotary embeddings, qk-norm, K/V heads.
    is_causal: causal self-attention (a property of the model, not a setting).
    use_bias: biases in the projections.

  When the ``intermediates`` collection is mutable, the weights
  ``[batch, heads, q_length, kv_length]`` are sown as ``attention_weights``,
  recomputed from this layer's (rotated) queries and keys with the mods, the
  ``mask`` and the padding of the lengths applied: the same whichever softmax
  kernel ran, and the kernel's own for one of other semantics.

  Padding travels as lengths (``kv_lengths``, ``q_lengths``), which the fused
  kernels (splash, pallas) take; a dense ``mask`` sends dispatch to a
  materialised kernel, so keep it for patterns lengths cannot express.
  """
  num_heads: int
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  attention: AttentionConfig = AttentionConfig()
  is_causal: bool = False
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, mask=None, bias=None,
               q_lengths=None, kv_lengths=None, positions=None,
               deterministic: bool = True):
    """Attends from ``inputs_q [batch, q_length, features]`` to ``inputs_kv``.

    Args:
      inputs_q: ``[batch..., q_length, q_features]``.
      inputs_kv: ``[batch..., kv_length, kv_features]``; None = self-attention.
      mask: bool broadcastable to ``[batch..., heads, q_length, kv_length]``.
      bias: float, same broadcasting.
      q_lengths: int ``[batch...]``, valid prefix of the queries: attention
        outputs past it are zeros (and so are their sown weight rows). Without
        it padded query rows attend as any other row.
      kv_lengths: int ``[batch...]``, valid prefix of the keys (trailing
        padding): keys at or past it are hidden, as by the mask
        ``arange(kv_length) < kv_lengths``, but fused kernels still run.
      positions: rotary positions of the tokens: int ``[length]`` or
        ``[batch..., length]`` for ``"1d"`` (default ``arange(length)``),
        ``[..., length, 2]`` (row, column) for ``"2d"`` (required).
      deterministic: disables dropout.

    Returns:
      ``[batch..., q_length, out_features]``.
    """
    config = self.attention
    self_attention = inputs_kv is None
    if self_attention:
      inputs_kv = inputs_q
    features = self.qkv_features or inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(
          f"MultiHeadAttention: qkv_features {features} is not divisible by "
          f"num_heads {self.num_heads}")
    kv_heads = config.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"MultiHeadAttention: num_heads {self.num_heads} is not a multiple "
                       f"of attention.num_kv_heads {kv_heads}")
    head_dim = features // self.num_heads
    project = lambda name, heads: nn.DenseGeneral(
        features=(heads, head_dim), use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, name=name)
    query = project("query", self.num_heads)(inputs_q)   # [batch..., q, heads, head_dim]
    key = project("key", kv_heads)(inputs_kv)            # [batch..., kv, kv_heads, head_dim]
    value = project("value", kv_heads)(inputs_kv)
    if config.qk_norm:
      # Per-head RMS norm bounds the logits (ViT-22B, Gemma 3), which lets
      # larger learning rates train without attention-logit blow-up.
      query = nn.RMSNorm(dtype=self.dtype, name="query_norm")(query)
      key = nn.RMSNorm(dtype=self.dtype, name="key_norm")(key)
    if config.rotary is not None:
      query, key = self._rotate(query, key, positions, self_attention)

    score_mod, mask_mod = self._mods()
    use_dropout = config.dropout_rate > 0.0 and not deterministic
    options = dict(config.options)
    out = kernels.dot_product_attention(
        query, key, value, bias, mask, is_causal=self.is_causal,
        local_window_size=config.window, implementation=config.kernel,
        q_lengths=q_lengths, kv_lengths=kv_lengths, score_mod=score_mod, mask_mod=mask_mod,
        dropout_rate=config.dropout_rate if use_dropout else 0.0,
        dropout_rng=self.make_rng("dropout") if use_dropout else None,
        deterministic=not use_dropout, return_residual=config.sinks, **options)
    kept = None
    if config.sinks:
      # A sink joins the softmax's denominator: each weight (and so the
      # output) shrinks by exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink).
      out, lse = out
      sink = self.param("sinks", nn.initializers.zeros, (self.num_heads,))
      kept = jax.nn.sigmoid(lse - sink)                        # [batch..., q, heads]
      out = out * kept[..., None].astype(out.dtype)
    if self.is_mutable_collection("intermediates"):
      padding = masks.combine_masks(
          mask,
          None if kv_lengths is None else masks.key_padding_mask(kv_lengths, key.shape[-3]),
          None if q_lengths is None
          else masks.padding_mask(q_lengths, query.shape[-3])[..., None, :, None])
      weights = kernels.attention_weights(
          query, key, bias, padding, is_causal=self.is_causal,
          local_window_size=config.window, score_mod=score_mod, mask_mod=mask_mod,
          implementation=config.kernel)
      if kept is not None:
        weights = weights * jnp.swapaxes(kept, -1, -2)[..., None]   # what the sink took
      self.sow("intermediates", "attention_weights", weights)
    return nn.DenseGeneral(
        features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, name="out")(out)

  def _rotate(self, query, key, positions, self_attention):
    """Rotary embeddings on ``query`` and ``key`` (self-attention only: a
    cross-attention's two sides have no common positions)."""
    config = self.attention
    if not self_attention:
      raise ValueError("MultiHeadAttention: attention.rotary applies to self-attention; "
                       "leave it unset on cross-attention")
    if config.rotary == "1d":
      if positions is None:
        positions = np.arange(query.shape[-3])
      return (rotary_lib.apply_rotary(query, positions, config.rotary_base),
              rotary_lib.apply_rotary(key, positions, config.rotary_base))
    if positions is None:
      raise ValueError("MultiHeadAttention: attention.rotary='2d' needs positions "
                       "[length, 2] (row, column); a ViT passes its patch grid")
    return (rotary_lib.apply_rotary_2d(query, positions, config.rotary_base),
            rotary_lib.apply_rotary_2d(key, positions, config.rotary_base))

  def _mods(self):
    """The configured score_mod and mask_mod as functions (or None)."""
    config = self.attention
    score_mod = mask_mod = None
    if config.score_mod is not None:
      args = dict(config.score_mod_args)
      if config.score_mod in LAYER_MODS:
        score_mod = LAYER_MODS[config.score_mod](self, self.num_heads, self.is_causal, **args)
      else:
        score_mod = mods.get(config.score_mod)(**args)
    if config.mask_mod is not None:
      mask_mod = mods.get(config.mask_mod)(**dict(config.mask_mod_args))
    return score_mod, mask_mod


class SelfAttention(MultiHeadAttention):
  """Self-attention: queries, keys and values all come from ``inputs``.

  For trailing padding pass ``kv_lengths`` (padded keys hidden, padded query
  rows still computed, as the mask ``valid[:, None, None, :]`` does); add
  ``q_lengths`` to zero the padded rows too.
  """

  @nn.compact
  def __call__(self, inputs, *, mask=None, bias=None, q_lengths=None,
               kv_lengths=None, positions=None, deterministic=True):
    return super().__call__(inputs, None, mask=mask, bias=bias, q_lengths=q_lengths,
                            kv_lengths=kv_lengths, positions=positions,
                            deterministic=deterministic)


class CrossAttention(MultiHeadAttention):
  """Cross-attention: queries from ``inputs``, keys and values from ``context``
  (``kv_lengths``: the valid prefix of ``context``)."""

  @nn.compact
  def __call__(self, inputs, context, *, mask=None, bias=None, q_lengths=None,
               kv_lengths=None, deterministic=True):
    return super().__call__(inputs, context, mask=mask, bias=bias, q_lengths=q_lengths,
                            kv_lengths=kv_lengths, deterministic=deterministic)
