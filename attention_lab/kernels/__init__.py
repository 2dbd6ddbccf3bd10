"""Attention kernels: pure functions, chosen by name.

Every kernel follows one contract::

    fn(query, key, value, bias=None, mask=None, *, scale=None,
       is_causal=False, **options) -> out

with ``query [batch..., q_length, heads, head_dim]``, key/value
``[batch..., kv_length, kv_heads, dim]``, a boolean ``mask`` (True = attend)
and a float ``bias``, both broadcastable to
``[batch..., heads, q_length, kv_length]``. A query with no valid key returns
zeros; softmax runs in float32 or wider.

``dot_product_attention`` is the one entry point models use. It validates the
inputs, checks the requested features against the chosen kernel's declared
capabilities, and with ``implementation=None`` picks the first kernel in the
backend's preference order that can do the job (logging the choice once).
It also satisfies Flax's ``attention_fn`` contract, so
``nn.MultiHeadDotProductAttention(attention_fn=dot_product_attention)`` works.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import jax
import jax.numpy as jnp
from absl import logging

from attention_lab.kernels import checks
from attention_lab.kernels import masks
from attention_lab.kernels import scores
from attention_lab.kernels.blockwise import blockwise_attention
from attention_lab.kernels.jax_nn import jax_nn_attention
from attention_lab.kernels.pallas import pallas_attention
from attention_lab.kernels.reference import attention_weights
from attention_lab.kernels.reference import reference_attention
from attention_lab.kernels.ring import ring_attention

FEATURES = ("mask", "bias", "causal", "window", "dropout", "weights")
PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """A registered kernel and what it can do.

  Attributes:
    name: registry name, used by ``config.model.kernel``.
    fn: the pure function (kernel contract above).
    features: subset of ``FEATURES`` it supports.
    platforms: backends it runs on.
    dtypes: input dtypes it accepts.
    description: one line for listings.
    applies: optional ``fn(AttentionShape) -> bool``: automatic dispatch
      skips the kernel when it says no (a hard limit such as cuDNN's head
      sizes, or shapes where the next kernel is measurably faster). An
      explicit ``implementation=`` ignores it.
    automatic: False for kernels that only run when named (``ring`` needs a
      device mesh with a sequence axis, which a call cannot infer).
  """
  name: str
  fn: Callable
  features: FrozenSet[str]
  platforms: Tuple[str, ...] = PLATFORMS
  dtypes: Tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
  description: str = ""
  applies: Optional[Callable[[checks.AttentionShape], bool]] = None
  automatic: bool = True

  def supports(self, feature: str) -> bool:
    return feature in self.features


_REGISTRY: Dict[str, KernelSpec] = {}
# First kernel in the list that supports the request wins. Later issues insert
# faster kernels at the front for their backend.
_PREFERENCE: Dict[str, List[str]] = {p: [] for p in PLATFORMS}
_LOGGED_CHOICES = set()


def register(spec: KernelSpec, prefer_on: Tuple[str, ...] = ()) -> None:
  """Adds a kernel; ``prefer_on`` puts it first in those backends' order."""
  unknown = set(spec.features) - set(FEATURES)
  if unknown:
    raise ValueError(f"kernel {spec.name!r} declares unknown features {sorted(unknown)}")
  _REGISTRY[spec.name] = spec
  for platform in PLATFORMS:
    order = [n for n in _PREFERENCE[platform] if n != spec.name]
    if platform in prefer_on:
      order.insert(0, spec.name)
    elif platform in spec.platforms:
      order.append(spec.name)
    _PREFERENCE[platform] = order


def names() -> List[str]:
  """Registered kernel names, sorted."""
  return sorted(_REGISTRY)


def get(name: str) -> KernelSpec:
  """The spec of kernel ``name``; ValueError listing the known ones."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"unknown attention kernel {name!r}; known kernels: {', '.join(names())}"
    ) from None


def capabilities(name: str) -> Dict[str, object]:
  """Declared capabilities of a kernel, as plain data."""
  spec = get(name)
  caps: Dict[str, object] = {f: f in spec.features for f in FEATURES}
  caps["platforms"] = spec.platforms
  caps["dtypes"] = spec.dtypes
  return caps


def preference(platform: Optional[str] = None) -> List[str]:
  """The dispatch order on ``platform`` (default: the current backend)."""
  return list(_PREFERENCE[platform or jax.default_backend()])


def requested_features(*, mask=None, bias=None, is_causal=False,
                       local_window_size=None, dropout=False,
                       weights=False) -> FrozenSet[str]:
  """The feature set a call needs, from its arguments."""
  wanted = {
      "mask": mask is not None, "bias": bias is not None, "causal": is_causal,
      "window": local_window_size is not None, "dropout": dropout,
      "weights": weights,
  }
  return frozenset(f for f, on in wanted.items() if on)


def _why_not(spec: KernelSpec, features, dtype, shape) -> Optional[str]:
  """None if ``spec`` can run this call, else the reason it cannot."""
  if not spec.automatic:
    return "only when named"
  missing = sorted(features - spec.features)
  if missing:
    return f"lacks {', '.join(missing)}"
  if dtype is not None and str(dtype) not in spec.dtypes:
    return f"not for {dtype}"
  if shape is not None and spec.applies is not None and not spec.applies(shape):
    return "not for this shape"
  return None


def select(features: FrozenSet[str], platform: Optional[str] = None,
           dtype=None, shape: Optional[checks.AttentionShape] = None) -> KernelSpec:
  """The preferred kernel on ``platform`` that can run this call.

  Every skipped kernel is named, with the reason, in the (once per choice) log.
  """
  platform = platform or jax.default_backend()
  order = _PREFERENCE.get(platform, [])
  skipped = []
  for name in order:
    spec = _REGISTRY[name]
    reason = _why_not(spec, features, dtype, shape)
    if reason:
      skipped.append(f"{name} ({reason})")
      continue
    key = (platform, features, str(dtype), name, tuple(skipped))
    if key not in _LOGGED_CHOICES:
      _LOGGED_CHOICES.add(key)
      logging.info("attention kernel on %s for %s: %s%s", platform,
                   sorted(features) or "plain attention", name,
                   f"; skipped {', '.join(skipped)}" if skipped else "")
    return spec
  raise ValueError(
      f"no registered kernel on {platform} supports {sorted(features)}; "
      f"kernels: {', '.join(names())}")


def check_supported(spec: KernelSpec, features: FrozenSet[str],
                    platform: Optional[str] = None, dtype=None) -> None:
  """ValueError naming the kernel and the first missing feature, platform or dtype."""
  missing = sorted(features - spec.features)
  if missing:
    raise ValueError(
        f"attention kernel {spec.name!r} does not support {missing[0]!r} "
        f"(it supports: {', '.join(sorted(spec.features)) or 'nothing optional'})")
  platform = platform or jax.default_backend()
  if platform not in spec.platforms:
    raise ValueError(
        f"attention kernel {spec.name!r} does not run on {platform!r} "
        f"(platforms: {', '.join(spec.platforms)})")
  if dtype is not None and str(dtype) not in spec.dtypes:
    raise ValueError(
        f"attention kernel {spec.name!r} does not support dtype {dtype} "
        f"(dtypes: {', '.join(spec.dtypes)})")


def dot_product_attention(query, key, value, bias=None, mask=None, *,
                          scale: Optional[float] = None,
                          is_causal: bool = False, local_window_size=None,
                          implementation: Optional[str] = None,
                          dropout_rng=None, dropout_rate: float = 0.0,
                          broadcast_dropout: bool = True,
                          deterministic: bool = False, dtype=None,
                          precision=None, module=None, **options):
  """Scaled dot-product attention through a registered kernel.

  Signature-compatible with ``jax.nn.dot_product_attention`` (query, key,
  value, bias, mask, scale, is_causal, local_window_size, implementation) and
  with Flax linen's ``attention_fn`` (mask, dropout_rng, dropout_rate,
  broadcast_dropout, deterministic, dtype, precision, module).

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, kv_heads, head_dim]``.
    value: ``[batch..., kv_length, kv_heads, value_dim]``.
    bias: float, broadcastable to ``[batch..., heads, q_length, kv_length]``.
    mask: same broadcasting; True (or nonzero, as Flax's float masks) = attend.
    implementation: a registered kernel name, or None for the backend default.
    dropout_rate / dropout_rng / deterministic / broadcast_dropout: dropout on
      the weights, applied when ``dropout_rate > 0 and not deterministic``.
    dtype: cast query, key and value to this dtype first (Flax semantics).
    module: a Flax module; when given (Flax passes it with ``sow_weights``),
      the weights are sown into its ``intermediates`` collection.
    **options: kernel-specific options, passed to kernels that name them.

  Returns:
    ``[batch..., q_length, heads, value_dim]``.
  """
  if dtype is not None:
    query, key, value = (x.astype(dtype) for x in (query, key, value))
  mask = checks.as_bool_mask(mask)
  shape = checks.check_inputs(query, key, value, mask, bias,
                              who="dot_product_attention")
  use_dropout = dropout_rate > 0.0 and not deterministic
  return_weights = bool(options.get("return_weights", False))
  features = requested_features(mask=mask, bias=bias, is_causal=is_causal,
                                local_window_size=local_window_size,
                                dropout=use_dropout, weights=return_weights)
  if implementation is None:
    spec = select(features, dtype=query.dtype, shape=shape)
  else:
    spec = get(implementation)
    check_supported(spec, features, dtype=query.dtype)

  kwargs = {k: v for k, v in options.items()
            if not (k == "return_weights" and not v)}
  if local_window_size is not None:
    kwargs["local_window_size"] = local_window_size
  if use_dropout:
    if dropout_rng is None:
      raise ValueError("dot_product_attention: dropout_rate > 0 with "
                       "deterministic=False needs dropout_rng")
    kwargs.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                  broadcast_dropout=broadcast_dropout)
  if precision is not None:
    kwargs["precision"] = precision
  accepted = inspect.signature(spec.fn).parameters
  unknown = [k for k in kwargs if k not in accepted]
  if unknown:
    raise ValueError(
        f"attention kernel {spec.name!r} does not take option(s) {unknown}")
  if shape.q_length == 0 or shape.kv_length == 0:
    # No queries, or nothing to attend to (every row fully masked): zeros by
    # the contract, without asking a kernel to tile an empty axis.
    out = jnp.zeros(shape.batch + (shape.q_length, shape.heads, shape.value_dim),
                    jnp.result_type(query.dtype, value.dtype))
    if return_weights:
      out = (out, jnp.zeros(shape.scores, jnp.float32))
  else:
    out = spec.fn(query, key, value, bias=bias, mask=mask, scale=scale,
                  is_causal=is_causal, **kwargs)
  if module is not None:
    module.sow("intermediates", "attention_weights", attention_weights(
        query, key, bias, mask, scale=scale, is_causal=is_causal,
        local_window_size=local_window_size))
  return out


def attention_fn(name: Optional[str]):
  """A Flax ``attention_fn`` bound to kernel ``name`` (None: backend default).

  Validates the name now, so a bad config fails before any tracing.
  """
  if name is not None:
    get(name)

  def fn(query, key, value, bias=None, mask=None, *, dropout_rng=None,
         dropout_rate=0.0, broadcast_dropout=True, deterministic=False,
         dtype=None, precision=None, module=None, scale=None, is_causal=False,
         local_window_size=None):
    return dot_product_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        local_window_size=local_window_size, implementation=name,
        dropout_rng=dropout_rng, dropout_rate=dropout_rate,
        broadcast_dropout=broadcast_dropout, deterministic=deterministic,
        dtype=dtype, precision=precision, module=module)

  fn.__name__ = f"attention_fn_{name or 'auto'}"
  return fn


_CUDNN_HEAD_DIMS = frozenset(range(8, 257, 8))  # cuDNN's fused attention limits
# Below this many keys the materialised jax.nn formulation is faster on CPU
# (benchmarks/README.md: at 512 tokens jax.nn runs 1.4x blockwise's speed, at
# 1,024 blockwise runs 2.4x jax.nn's).
BLOCKWISE_MIN_KV_LENGTH = 1024


register(KernelSpec(
    name="reference", fn=reference_attention,
    features=frozenset(FEATURES),
    description="materialised softmax(q k^T) v; float64-checkable ground truth"))
register(KernelSpec(
    name="jax_nn", fn=jax_nn_attention,
    features=frozenset({"mask", "bias", "causal", "window"}),
    description="jax.nn.dot_product_attention, XLA formulation"),
    prefer_on=("tpu", "gpu", "cpu"))
register(KernelSpec(
    name="pallas", fn=pallas_attention,
    features=frozenset({"causal", "window"}),
    dtypes=("float32", "bfloat16", "float16"),
    description="Pallas flash attention (GPU/TPU; interpreted on CPU); kv_lengths for padding"),
    prefer_on=("tpu", "gpu"))
register(KernelSpec(
    name="cudnn", fn=functools.partial(jax_nn_attention, jax_implementation="cudnn"),
    features=frozenset({"mask", "bias", "causal", "window"}),
    platforms=("gpu",), dtypes=("bfloat16", "float16"),
    applies=lambda s: s.head_dim == s.value_dim and s.head_dim in _CUDNN_HEAD_DIMS,
    description="cuDNN fused attention through jax.nn (GPU, half precision)"),
    prefer_on=("gpu",))
register(KernelSpec(
    name="blockwise", fn=blockwise_attention,
    features=frozenset({"mask", "bias", "causal", "window"}),
    applies=lambda s: s.kv_length >= BLOCKWISE_MIN_KV_LENGTH,
    description="online softmax over key blocks, custom_vjp; O(length) memory"),
    prefer_on=("cpu",))
register(KernelSpec(
    name="ring", fn=ring_attention,
    features=frozenset({"causal", "window"}),
    automatic=False,
    description="sequence-parallel ring attention over a mesh axis (shard_map + ppermute); "
                "kv_lengths for padding"))

__all__ = [
    "FEATURES", "KernelSpec", "attention_fn", "attention_weights", "blockwise_attention",
    "capabilities", "check_supported", "dot_product_attention", "get",
    "jax_nn_attention", "masks", "names", "pallas_attention", "preference",
    "reference_attention", "ring_attention",
    "register", "requested_features", "scores", "select",
]
