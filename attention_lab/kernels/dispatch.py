"""``dot_product_attention``: one entry point, a kernel per *lowering* platform.

The kernel is chosen for the platform the computation is lowered for, not for
the process's default backend: automatic dispatch picks a kernel for each of
CPU, GPU and TPU and, when they differ, wraps them in
``jax.lax.platform_dependent``. A function jitted here and exported (or
cross-lowered) for TPU therefore carries the TPU kernel; on CPU, XLA keeps
only the CPU branch (no run-time cost). Each choice is logged once.
"""

from __future__ import annotations

import functools
import math
from typing import FrozenSet, Optional

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from attention_lab.kernels import checks
from attention_lab.kernels import masks
from attention_lab.kernels import registry
from attention_lab.kernels import reference

JAX_IMPLEMENTATIONS = registry.JAX_IMPLEMENTATIONS
# platform_dependent's platform names -> the registry's.
_LOWERING_PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
DATA_AXIS = "data"
_LOGGED_CHOICES = set()


def requested_features(*, mask=None, bias=None, is_causal=False,
                       local_window_size=None, dropout=False,
                       weights=False, residual=False, score_mod=None,
                       mask_mod=None) -> FrozenSet[str]:
  """The feature set a call needs, from its arguments."""
  wanted = {
      "mask": mask is not None, "bias": bias is not None, "causal": is_causal,
      "window": local_window_size is not None, "dropout": dropout,
      "weights": weights, "residual": residual,
      "score_mod": score_mod is not None, "mask_mod": mask_mod is not None,
  }
  return frozenset(f for f, on in wanted.items() if on)


def _why_not(spec: registry.KernelSpec, features, dtype, shape,
             kv_lengths: bool = False, mask_mod=None, score_mod=None,
             platform: Optional[str] = None, window=None, options=None) -> Optional[str]:
  """None if ``spec`` can run this call (on ``platform``, when given), else
  the reason it cannot."""
  if not spec.automatic:
    return "only when named"
  needed = set(features)
  if kv_lengths and not spec.takes("kv_lengths"):
    needed.add("mask")                        # lengths become a padding mask
  missing = sorted(needed - spec.features)
  if missing:
    return f"lacks {', '.join(missing)}"
  if dtype is not None and str(dtype) not in spec.dtypes:
    return f"not for {dtype}"
  if shape is not None and spec.applies is not None and not spec.applies(shape):
    faster = registry.get(spec.yields_to) if spec.yields_to else None
    if faster is None or not _why_not(faster, features, dtype, shape, kv_lengths,
                                      mask_mod, score_mod, platform, window, options):
      return "not for this shape" if faster is None else f"{faster.name} is faster here"
  if shape is not None and spec.limit is not None and platform is not None:
    reason = spec.limit(platform, shape, dtype, frozenset(features), window=window,
                        options=options or {}, score_mod=score_mod)
    if reason:
      return reason
  if (shape is not None and spec.refuses is not None
      and (mask_mod is not None or score_mod is not None)):
    return spec.refuses(shape, mask_mod, score_mod)
  return None


def select(features: FrozenSet[str], platform: Optional[str] = None, dtype=None,
           shape: Optional[checks.AttentionShape] = None,
           kv_lengths: bool = False, mask_mod=None, score_mod=None,
           window=None, options=None) -> registry.KernelSpec:
  """The preferred kernel on ``platform`` (default: the lowering target) that
  can run this call (``mask_mod`` / ``score_mod``: the call's, for kernels
  that take only some; ``window``: its ``(left, right)`` sides; ``options``:
  its kernel options, block sizes). Every skipped kernel is named, with the
  reason, in the (once per choice) log."""
  platform = platform or target_platform()
  skipped = []
  for name in registry.preference(platform):
    spec = registry.get(name)
    reason = _why_not(spec, features, dtype, shape, kv_lengths, mask_mod, score_mod, platform,
                      window, options)
    if reason:
      skipped.append(f"{name} ({reason})")
      continue
    _log_choice(platform, features, dtype, name,
                f"; skipped {', '.join(skipped)}" if skipped else "", kv_lengths)
    return spec
  raise ValueError(
      f"no registered kernel on {platform} supports {sorted(features)}; "
      f"kernels: {', '.join(registry.names())}")


def _log_choice(platform, features, dtype, name, note, kv_lengths=False) -> None:
  """Logs, once per distinct choice, which kernel runs this kind of call."""
  key = (platform, features, str(dtype), kv_lengths, name, note)
  if key not in _LOGGED_CHOICES:
    _LOGGED_CHOICES.add(key)
    logging.info("attention kernel on %s for %s: %s%s", platform,
                 sorted(features) or "plain attention", name, note)


def target_platform() -> str:
  """The platform being lowered for when a named kernel is checked: the
  abstract mesh's device when one is set (cross-lowering), else the default
  backend."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  platform = device.platform if device is not None else jax.default_backend()
  return _LOWERING_PLATFORMS.get(platform, platform)


def check_supported(spec: registry.KernelSpec, features: FrozenSet[str],
                    platform: Optional[str] = None, dtype=None) -> None:
  """ValueError naming the kernel and the first missing feature, platform or dtype."""
  missing = sorted(features - spec.features)
  if missing:
    raise ValueError(
        f"attention kernel {spec.name!r} does not support {missing[0]!r} "
        f"(it supports: {', '.join(sorted(spec.features)) or 'nothing optional'})")
  platform = platform or target_platform()
  if platform not in spec.platforms:
    raise ValueError(
        f"attention kernel {spec.name!r} does not run on {platform!r} "
        f"(platforms: {', '.join(spec.platforms)})")
  if dtype is not None and str(dtype) not in spec.dtypes:
    raise ValueError(
        f"attention kernel {spec.name!r} does not support dtype {dtype} "
        f"(dtypes: {', '.join(spec.dtypes)})")


def _precision_name(precision) -> str:
  """A ``lax.Precision`` (or pair, or string) as ``default_matmul_precision`` takes it."""
  if isinstance(precision, (tuple, list)):
    precision = max(precision, key=lambda p: jax.lax.Precision(p).value)
  if isinstance(precision, str):
    return precision
  return {0: "default", 1: "high", 2: "highest"}[jax.lax.Precision(precision).value]


def _data_axis_size() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[DATA_AXIS]


def _per_device_bias_spec(bias, shape: checks.AttentionShape):
  """How a bias splits over the data axis for a per-device kernel: None (no
  bias), ``P()`` (shared by every row: replicated), ``P(data)`` (one per row),
  or False (a layout the rows cannot be cut from)."""
  if bias is None:
    return None
  lead = bias.ndim - 3      # the bias's batch dims (it broadcasts from the right)
  if lead <= 0 or all(d == 1 for d in bias.shape[:lead]):
    return P()
  if lead == len(shape.batch) and bias.shape[0] == shape.batch[0]:
    return P(DATA_AXIS)
  return False


def _run(spec: registry.KernelSpec, query, key, value, bias, mask, q_lengths, kv_lengths,
         *, shape: checks.AttentionShape, scale, is_causal, kwargs, precision):
  """Calls one kernel: lengths as the kernel takes them, per device when it
  must be, ``precision`` through JAX's matmul precision when it has none."""
  residual = bool(kwargs.get("return_residual"))
  kwargs = dict(kwargs)
  if kv_lengths is not None:
    if spec.takes("kv_lengths"):
      kwargs["kv_lengths"] = kv_lengths
    else:
      padding = masks.key_padding_mask(kv_lengths, shape.kv_length)   # [batch..., 1, 1, kv]
      mask = padding if mask is None else mask & padding
  if q_lengths is not None and spec.takes("q_lengths"):
    kwargs["q_lengths"] = q_lengths
  if precision is not None and spec.takes("precision"):
    kwargs["precision"] = precision

  kv = kwargs.pop("kv_lengths", None)

  def call(query, key, value, bias, mask, kv, first_row=None):
    extra = {} if kv is None else {"kv_lengths": kv}
    return spec.fn(query, key, value, bias=bias, mask=mask, scale=scale,
                   is_causal=is_causal, **_shift_batch(kwargs, first_row), **extra)

  devices = _data_axis_size()
  bias_spec = _per_device_bias_spec(bias, shape)
  if (spec.per_device and devices > 1 and len(shape.batch) >= 1
      and shape.batch[0] % devices == 0 and bias_spec is not False and mask is None):
    # GSPMD cannot split a pallas_call: run it on each device's rows.
    if kv is None:
      kv = jnp.full(shape.batch, shape.kv_length, jnp.int32)
    rows = P(DATA_AXIS)
    # Manual over every mesh axis: Mosaic refuses a kernel while any axis is
    # still left to the automatic partitioner (rows are replicated over the
    # others, so each device attends over its own rows in full).
    # A device's rows are rows [i * rows, (i + 1) * rows) of the whole
    # batch: the mods see those global batch indices (a document mask reads
    # its own sequence's ids). Splash, which takes no score_mod, refuses a
    # mask_mod of the batch index and evaluates its mask_mod on the host, so
    # it gets none (the offset is a device value).
    first_row = lambda q: (jax.lax.axis_index(DATA_AXIS) * math.prod(q.shape[:len(shape.batch)])
                           if spec.supports("score_mod") else None)
    in_specs = (rows,) * 4 + (bias_spec or P(),)      # None: an empty pytree
    per_device = jax.shard_map(
        lambda q, k, v, kv, bias: call(q, k, v, bias, None, kv, first_row(q)),
        in_specs=in_specs,
        out_specs=rows, axis_names=set(jax.sharding.get_abstract_mesh().axis_names),
        check_vma=False)
    args = (query, key, value, kv, bias)
    if any(t == jax.sharding.AxisType.Explicit
           for t in jax.sharding.get_abstract_mesh().axis_types):
      # Under Explicit axes shard_map takes each input only already laid out
      # as its in_spec (the lengths made above are replicated, the inputs
      # may be): move them there first.
      args = tuple(None if a is None else jax.reshard(a, s) for a, s in zip(args, in_specs))
    run = lambda: per_device(*args)
  else:
    run = lambda: call(query, key, value, bias, mask, kv)
  if precision is not None and not spec.takes("precision"):
    with jax.default_matmul_precision(_precision_name(precision)):
      out = run()
  else:
    out = run()
  if residual:
    # One dtype from every kernel (platform_dependent's branches must agree).
    out = (out[0], out[1].astype(jnp.float32))
  if q_lengths is not None and not spec.takes("q_lengths"):
    # Query padding: rows past the length attend to nothing: zeros, and an
    # empty log-sum-exp.
    valid = masks.padding_mask(q_lengths, shape.q_length)[..., None]    # [batch..., q, 1]
    if isinstance(out, tuple):
      first = jnp.where(valid[..., None], out[0], 0).astype(out[0].dtype)
      rest = out[1:]
      if residual:
        rest = (jnp.where(valid, rest[0], -jnp.inf),) + rest[1:]
      out = (first,) + rest
    else:
      out = jnp.where(valid[..., None], out, 0).astype(out.dtype)
  return out


def _shift_batch(kwargs, first_row):
  """``kwargs`` with its score_mod / mask_mod reading batch index
  ``first_row + b`` for local row ``b`` (None: unchanged)."""
  if first_row is None:
    return kwargs
  kwargs = dict(kwargs)
  if kwargs.get("score_mod") is not None:
    score_mod = kwargs["score_mod"]
    kwargs["score_mod"] = lambda score, b, *index: score_mod(score, b + first_row, *index)
  if kwargs.get("mask_mod") is not None:
    mask_mod = kwargs["mask_mod"]
    kwargs["mask_mod"] = lambda b, *index: mask_mod(b + first_row, *index)
  return kwargs


def dot_product_attention(query, key, value, bias=None, mask=None, *,
                          scale: Optional[float] = None,
                          is_causal: bool = False, local_window_size=None,
                          implementation: Optional[str] = None,
                          query_seq_lengths=None, key_value_seq_lengths=None,
                          q_lengths=None, kv_lengths=None,
                          dropout_rng=None, dropout_rate: float = 0.0,
                          broadcast_dropout: bool = True,
                          deterministic: bool = False, dtype=None,
                          precision=None, module=None, return_residual: bool = False,
                          score_mod=None, mask_mod=None, **options):
  """Scaled dot-product attention through a registered kernel.

  A drop-in for ``jax.nn.dot_product_attention`` (query, key, value, bias,
  mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
  local_window_size, implementation, return_residual) and for Flax
  linen's ``attention_fn`` (mask, dropout_rng, dropout_rate,
  broadcast_dropout, deterministic, dtype, precision, module).

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, kv_heads, head_dim]``.
    value: ``[batch..., kv_length, kv_heads, value_dim]``.
    bias: float, broadcastable to ``[batch..., heads, q_length, kv_length]``;
      ``-inf`` hides a key.
    mask: same broadcasting; True (or nonzero, as Flax's float masks) = attend.
    implementation: a registered kernel name, JAX's ``"xla"`` / ``"cudnn"``,
      a per-platform pin (``"cpu=blockwise"``, ``"cpu=reference,gpu=jax_nn"``
      or a dict: other platforms choose automatically), or None: per lowering
      platform, the first kernel in its preference order that can run the call.
    q_lengths / kv_lengths (JAX's ``query_seq_lengths`` /
      ``key_value_seq_lengths``): int ``[batch...]`` valid prefix lengths;
      padded query rows return zeros.
    dropout_rate / dropout_rng / deterministic / broadcast_dropout: dropout on
      the weights, applied when ``dropout_rate > 0 and not deterministic``.
    dtype: compute dtype: query, key and value are cast to it first and the
      output has it (Flax semantics).
    precision: matmul precision (Flax passes its module's); kernels without
      a ``precision`` parameter run under ``jax.default_matmul_precision``.
    module: a Flax module; when given (Flax passes it with ``sow_weights``),
      the weights are sown into its ``intermediates`` collection.
    return_residual: also return the log-sum-exp of each query's scaled and
      biased scores, float32 ``[batch..., q_length, heads]`` (jax.nn's
      residual); gradients flow through it. A query with no key gets
      ``-inf`` (jax.nn gives a large finite negative there).
    score_mod: ``f(score, batch_idx, head_idx, q_idx, kv_idx) -> score``,
      applied to the float32 scaled and biased logits before masking.
    mask_mod: ``g(batch_idx, head_idx, q_idx, kv_idx) -> bool``, True =
      attend; combined with the other masks. For both, ``score`` is
      ``[B, heads, Q, K]`` and the indices are int32 ``[B, 1, 1, 1]``,
      ``[1, heads, 1, 1]``, ``[1, 1, Q, 1]``, ``[1, 1, 1, K]`` (``B``: the
      batch dims flattened), over the whole matrix or one block of it;
      see ``attention_lab.kernels.mods``. Kernels without the feature are
      skipped by automatic dispatch (``reference`` and ``blockwise`` take
      any; ``pallas`` those it can lower, ``splash`` static mask_mods);
      naming one is a ValueError.
    **options: kernel-specific options, passed to kernels that name them.

  Returns:
    ``[batch..., q_length, heads, value_dim]``, or ``(out, residual)``.
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if jnp.iscomplexobj(x):
      raise ValueError(f"dot_product_attention: complex {name} ({x.dtype}) is not supported")
  if dtype is not None:
    query, key, value = (x.astype(dtype) for x in (query, key, value))
  q_lengths = _one_of("q_lengths", q_lengths, "query_seq_lengths", query_seq_lengths)
  kv_lengths = _one_of("kv_lengths", kv_lengths, "key_value_seq_lengths", key_value_seq_lengths)
  mask = checks.as_bool_mask(mask)
  shape = checks.check_inputs(query, key, value, mask, bias, who="dot_product_attention")
  checks.check_lengths("dot_product_attention", "q_lengths", q_lengths, shape.batch)
  checks.check_lengths("dot_product_attention", "kv_lengths", kv_lengths, shape.batch)
  if local_window_size is not None and not isinstance(local_window_size, int):
    local_window_size = tuple(local_window_size)
  use_dropout = dropout_rate > 0.0 and not deterministic
  return_weights = bool(options.get("return_weights", False))
  if return_weights and return_residual:
    raise ValueError("dot_product_attention: ask for return_weights or return_residual, "
                     "not both")
  features = requested_features(mask=mask, bias=bias, is_causal=is_causal,
                                local_window_size=local_window_size,
                                dropout=use_dropout, weights=return_weights,
                                residual=return_residual, score_mod=score_mod,
                                mask_mod=mask_mod)

  kwargs = {k: v for k, v in options.items() if not (k == "return_weights" and not v)}
  window_sides = None if local_window_size is None else masks._window_sides(local_window_size)
  if local_window_size is not None:
    kwargs["local_window_size"] = local_window_size
  if return_residual:
    kwargs["return_residual"] = True
  if score_mod is not None:
    kwargs["score_mod"] = score_mod
  if mask_mod is not None:
    kwargs["mask_mod"] = mask_mod
  if use_dropout:
    if dropout_rng is None:
      raise ValueError("dot_product_attention: dropout_rate > 0 with "
                       "deterministic=False needs dropout_rng")
    kwargs.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                  broadcast_dropout=broadcast_dropout)

  choice = registry.parse_choice(implementation)
  lengths_as_mask = lambda spec: ({"mask"} if kv_lengths is not None
                                  and not spec.takes("kv_lengths") else frozenset())
  if isinstance(choice, str):
    spec = registry.get(choice)
    interpreted = bool(options.get("interpret")) or options.get("target") is not None
    check_supported(spec, features | lengths_as_mask(spec),
                    platform=None if not interpreted else spec.platforms[0],
                    dtype=query.dtype)
    _check_refusal(spec, shape, mask_mod, score_mod)
    choices = {p: spec for p in registry.PLATFORMS}
    _log_choice(target_platform(), features, query.dtype, spec.name, " (named)")
  else:
    choices = {}
    for p in registry.PLATFORMS:
      if choice and p in choice:       # pinned on this platform only
        spec = registry.get(choice[p])
        check_supported(spec, features | lengths_as_mask(spec), platform=p,
                        dtype=query.dtype)
        _check_refusal(spec, shape, mask_mod, score_mod)
        choices[p] = spec
        _log_choice(p, features, query.dtype, spec.name, " (pinned)")
      else:
        choices[p] = select(features, p, query.dtype, shape, kv_lengths is not None,
                            mask_mod, score_mod, window=window_sides, options=kwargs)
  for spec in set(choices.values()):
    unknown = [k for k in kwargs if not spec.takes(k)]
    if unknown:
      raise ValueError(f"attention kernel {spec.name!r} does not take option(s) {unknown}")

  if shape.q_length == 0 or shape.kv_length == 0:
    # No queries, or nothing to attend to (every row fully masked): zeros by
    # the contract, without asking a kernel to tile an empty axis.
    out = jnp.zeros(shape.batch + (shape.q_length, shape.heads, shape.value_dim),
                    jnp.result_type(query.dtype, value.dtype))
    if return_weights:
      out = (out, jnp.zeros(shape.scores, jnp.float32))
    if return_residual:
      out = (out, jnp.full(shape.batch + (shape.q_length, shape.heads), -jnp.inf, jnp.float32))
  else:
    run = functools.partial(_run, shape=shape, scale=scale, is_causal=is_causal,
                            kwargs=kwargs, precision=precision)
    args = (query, key, value, bias, mask, q_lengths, kv_lengths)
    distinct = {spec.name: spec for spec in choices.values()}
    if len(distinct) == 1:
      out = run(next(iter(distinct.values())), *args)
    else:
      branches = {lowering: functools.partial(run, choices[ours])
                  for lowering, ours in _LOWERING_PLATFORMS.items()}
      out = jax.lax.platform_dependent(*args, **branches)   # None args are empty pytrees
  if dtype is not None:
    out = (out[0].astype(dtype),) + tuple(out[1:]) if isinstance(out, tuple) else out.astype(dtype)
  if module is not None:
    module.sow("intermediates", "attention_weights", attention_weights(
        query, key, bias, _with_lengths(mask, q_lengths, kv_lengths, shape), scale=scale,
        is_causal=is_causal, local_window_size=local_window_size, score_mod=score_mod,
        mask_mod=mask_mod, implementation=implementation))
  return out


def attention_weights(query, key, bias=None, mask=None, *, implementation=None, **kwargs):
  """The weights ``[batch..., heads, q_length, kv_length]`` of the attention
  that kernel choice ``implementation`` computes: softmax weights
  (``reference.attention_weights``, whatever softmax kernel ran) unless a
  kernel with other semantics is named, which then gives its own. Pictures
  call this, so they show what the model computed.

  ``kwargs``: ``scale``, ``is_causal``, ``local_window_size``, ``precision``,
  ``score_mod``, ``mask_mod`` as ``reference.attention_weights`` takes them.
  """
  if registry.semantics_of(implementation) == registry.SOFTMAX:
    return reference.attention_weights(query, key, bias, mask, **kwargs)
  choice = registry.parse_choice(implementation)
  name = choice if isinstance(choice, str) else next(iter(choice.values()))
  kwargs = {k: v for k, v in kwargs.items() if v is not None and v is not False}
  return registry.get(name).weights(query, key, bias, mask, **kwargs)


def _check_refusal(spec: registry.KernelSpec, shape, mask_mod, score_mod=None) -> None:
  """A named kernel that cannot take this form of a feature: ValueError."""
  if spec.refuses is not None and (mask_mod is not None or score_mod is not None):
    reason = spec.refuses(shape, mask_mod, score_mod)
    if reason:
      raise ValueError(f"attention kernel {spec.name!r} cannot run this call: {reason}")


def _with_lengths(mask, q_lengths, kv_lengths, shape):
  """``mask`` and the padding of the lengths as one boolean mask (or None)."""
  parts = [mask]
  if kv_lengths is not None:
    parts.append(masks.key_padding_mask(kv_lengths, shape.kv_length))
  if q_lengths is not None:
    parts.append(masks.padding_mask(q_lengths, shape.q_length)[..., None, :, None])
  return masks.combine_masks(*parts)


def _one_of(ours: str, ours_value, jax_name: str, jax_value):
  if ours_value is not None and jax_value is not None:
    raise ValueError(f"dot_product_attention: pass {ours} or {jax_name}, not both")
  return ours_value if ours_value is not None else jax_value


def attention_fn(name: Optional[str]):
  """A Flax ``attention_fn`` bound to kernel choice ``name`` (a kernel, a
  per-platform pin such as ``"cpu=blockwise"``, or None: per platform).

  Validates the name now, so a bad config fails before any tracing.
  """
  registry.parse_choice(name)

  def fn(query, key, value, bias=None, mask=None, *, dropout_rng=None,
         dropout_rate=0.0, broadcast_dropout=True, deterministic=False,
         dtype=None, precision=None, module=None, scale=None, is_causal=False,
         local_window_size=None, q_lengths=None, kv_lengths=None, score_mod=None,
         mask_mod=None):
    return dot_product_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        local_window_size=local_window_size, implementation=name,
        q_lengths=q_lengths, kv_lengths=kv_lengths, score_mod=score_mod, mask_mod=mask_mod,
        dropout_rng=dropout_rng, dropout_rate=dropout_rate,
        broadcast_dropout=broadcast_dropout, deterministic=deterministic,
        dtype=dtype, precision=precision, module=module)

  fn.__name__ = f"attention_fn_{name or 'auto'}".replace("=", "_").replace(",", "_")
  return fn
