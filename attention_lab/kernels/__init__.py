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
import inspect
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import jax
from absl import logging

from attention_lab.kernels import checks
from attention_lab.kernels import masks
from attention_lab.kernels import scores
from attention_lab.kernels.jax_nn import jax_nn_attention
from attention_lab.kernels.reference import attention_weights
from attention_lab.kernels.reference import reference_attention

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
  """
  name: str
  fn: Callable
  features: FrozenSet[str]
  platforms: Tuple[str, ...] = PLATFORMS
  dtypes: Tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
  description: str = ""

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


def select(features: FrozenSet[str], platform: Optional[str] = None) -> KernelSpec:
  """The preferred kernel on ``platform`` that supports ``features``."""
  platform = platform or jax.default_backend()
  order = _PREFERENCE.get(platform, [])
  for position, name in enumerate(order):
    spec = _REGISTRY[name]
    if features <= spec.features:
      key = (platform, features, name)
      if key not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add(key)
        skipped = [
            f"{n} (lacks {', '.join(sorted(features - _REGISTRY[n].features))})"
            for n in order[:position]]
        logging.info("attention kernel on %s for %s: %s%s", platform,
                     sorted(features) or "plain attention", name,
                     f"; skipped {', '.join(skipped)}" if skipped else "")
      return spec
  raise ValueError(
      f"no registered kernel on {platform} supports {sorted(features)}; "
      f"kernels: {', '.join(names())}")


def check_supported(spec: KernelSpec, features: FrozenSet[str],
                    platform: Optional[str] = None) -> None:
  """ValueError naming the kernel and the first missing feature or platform."""
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
  checks.check_inputs(query, key, value, mask, bias,
                      who="dot_product_attention")
  use_dropout = dropout_rate > 0.0 and not deterministic
  return_weights = bool(options.get("return_weights", False))
  features = requested_features(mask=mask, bias=bias, is_causal=is_causal,
                                local_window_size=local_window_size,
                                dropout=use_dropout, weights=return_weights)
  if implementation is None:
    spec = select(features)
  else:
    spec = get(implementation)
    check_supported(spec, features)

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


register(KernelSpec(
    name="reference", fn=reference_attention,
    features=frozenset(FEATURES),
    description="materialised softmax(q k^T) v; float64-checkable ground truth"))
register(KernelSpec(
    name="jax_nn", fn=jax_nn_attention,
    features=frozenset({"mask", "bias", "causal", "window"}),
    description="jax.nn.dot_product_attention (XLA; cuDNN on GPU by option)"),
    prefer_on=PLATFORMS)

__all__ = [
    "FEATURES", "KernelSpec", "attention_fn", "attention_weights",
    "capabilities", "check_supported", "dot_product_attention", "get",
    "jax_nn_attention", "masks", "names", "preference", "reference_attention",
    "register", "requested_features", "scores", "select",
]
