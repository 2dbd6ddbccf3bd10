"""Attention kernels: pure functions, chosen by name.

Every kernel follows one contract::

    fn(query, key, value, bias=None, mask=None, *, scale=None,
       is_causal=False, **options) -> out

with ``query [batch..., q_length, heads, head_dim]``, key/value
``[batch..., kv_length, kv_heads, dim]``, a boolean ``mask`` (True = attend)
and a float ``bias``, both broadcastable to
``[batch..., heads, q_length, kv_length]``. A query with no valid key returns
zeros; softmax runs in float32 or wider.

``dot_product_attention`` (``dispatch.py``) is the one entry point models use.
It validates the inputs, checks the requested features against the chosen
kernel's declared capabilities (``registry.py``), and with
``implementation=None`` picks, for each platform the computation may be
lowered for, the first kernel in that platform's preference order (the table
at the bottom of this file) that can do the job, logging the choice once.
It also satisfies Flax's ``attention_fn`` contract, so
``nn.MultiHeadDotProductAttention(attention_fn=dot_product_attention)`` works.
"""

from __future__ import annotations

import functools

from attention_lab.kernels import checks
from attention_lab.kernels import linear
from attention_lab.kernels import dispatch
from attention_lab.kernels import registry
from attention_lab.kernels import masks
from attention_lab.kernels import mods
from attention_lab.kernels import softmax
from attention_lab.kernels import tuning
from attention_lab.kernels.blockwise import blockwise_attention
from attention_lab.kernels.dispatch import attention_fn
from attention_lab.kernels.dispatch import check_supported
from attention_lab.kernels.dispatch import dot_product_attention
from attention_lab.kernels.dispatch import requested_features
from attention_lab.kernels.dispatch import select
from attention_lab.kernels.dispatch import attention_weights
from attention_lab.kernels.jax_nn import cudnn_window_problem
from attention_lab.kernels.jax_nn import jax_nn_attention
from attention_lab.kernels.linear import linear_attention
from attention_lab.kernels.linear import linear_attention_weights
from attention_lab.kernels.pallas import pallas_attention
from attention_lab.kernels.pallas import pallas_limit
from attention_lab.kernels.pallas import pallas_refusal
from attention_lab.kernels.reference import reference_attention
from attention_lab.kernels.registry import FEATURES
from attention_lab.kernels.registry import PLATFORMS
from attention_lab.kernels.registry import KernelSpec
from attention_lab.kernels.registry import capabilities
from attention_lab.kernels.registry import get
from attention_lab.kernels.registry import names
from attention_lab.kernels.registry import register
from attention_lab.kernels.registry import set_preference
from attention_lab.kernels.ring import ring_attention
from attention_lab.kernels.splash import splash_attention
from attention_lab.kernels.splash import splash_refusal


def preference(platform=None):
  """The automatic dispatch order on ``platform`` (default: the lowering target)."""
  return registry.preference(platform or dispatch.target_platform())


_CUDNN_HEAD_DIMS = frozenset(range(8, 257, 8))  # cuDNN's fused attention limits


def _cudnn_limit(platform, shape, dtype, features, *, window=None, options=None,
                 score_mod=None):
  """A window jax.nn's cuDNN path cannot take (``cudnn_window_problem``)."""
  del platform, shape, dtype, options, score_mod
  return cudnn_window_problem(window, "causal" in features)


@functools.cache
def cudnn_available() -> bool:
  """Whether this jaxlib can reach cuDNN. jax.nn checks it while *tracing* a
  cuDNN call, and dispatch traces every platform's branch, so without cuDNN
  (any machine with no CUDA plugin) the GPU branch must not name it."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo
    fused_attention_stablehlo.check_cudnn_version()
    return True
  except Exception:   # no CUDA plugin, or jax moved the check: no cuDNN choice
    return False

# Below this many keys dispatch sends CPU calls to the materialised jax.nn
# formulation. Measured on this project's 2-core AMD EPYC (benchmarks/tune.py,
# 2026-11-30, forward+backward, head_dim 64): blockwise was 1.37x jax_nn at 512
# keys full and 1.19x causal, 1.45x and 1.38x at 256 (on an earlier CPU jax.nn
# led at 512). benchmarks/tune.py measures the cut-over on the current CPU
# (kernels.tuning), which replaces this default there.
BLOCKWISE_MIN_KV_LENGTH = 512


register(KernelSpec(
    name="reference", fn=reference_attention,
    features=frozenset(FEATURES),
    description="materialised softmax(q k^T) v; float64-checkable ground truth"))
register(KernelSpec(
    name="jax_nn", fn=jax_nn_attention,
    features=frozenset({"mask", "bias", "causal", "window", "residual"}),
    description="jax.nn.dot_product_attention, XLA formulation"))
register(KernelSpec(
    name="pallas", fn=pallas_attention,
    features=frozenset({"bias", "causal", "window", "residual", "dropout", "score_mod",
                        "mask_mod"}), refuses=pallas_refusal, limit=pallas_limit,
    dtypes=("float32", "bfloat16", "float16"), per_device=True,
    description="our Pallas flash kernel: Triton on GPU, Mosaic on TPU, interpreted on CPU; "
                "kv_lengths for padding, hashed dropout, additive bias, score_mod / mask_mod "
                "fused (no per-pair gathers)"))
register(KernelSpec(
    name="splash", fn=splash_attention,
    features=frozenset({"causal", "window", "mask_mod"}), refuses=splash_refusal,
    platforms=("tpu",), dtypes=("float32", "bfloat16"), per_device=True,
    applies=lambda s: s.head_dim == s.value_dim,
    description="JAX's splash attention (TPU): block-sparse static masks (static mask_mods too), kv_lengths as "
                "segment ids, grouped K/V heads"))
register(KernelSpec(
    name="cudnn", fn=functools.partial(jax_nn_attention, jax_implementation="cudnn"),
    features=frozenset({"mask", "bias", "causal", "window"}),
    platforms=("gpu",), dtypes=("bfloat16", "float16"), limit=_cudnn_limit,
    applies=lambda s: (s.head_dim == s.value_dim and s.head_dim in _CUDNN_HEAD_DIMS
                       and cudnn_available()),
    description="cuDNN fused attention through jax.nn (GPU, half precision)"))
register(KernelSpec(
    name="blockwise", fn=blockwise_attention,
    features=frozenset({"mask", "bias", "causal", "window", "residual", "score_mod",
                        "mask_mod", "dropout"}),
    applies=lambda s: s.kv_length >= tuning.blockwise_min_kv_length(BLOCKWISE_MIN_KV_LENGTH),
    yields_to="jax_nn",
    description="online softmax over key blocks, custom_vjp; O(length) memory; "
                "grouped K/V heads without copies, hashed dropout"))
register(KernelSpec(
    name="ring", fn=ring_attention,
    features=frozenset({"causal", "window"}),
    automatic=False,
    description="sequence-parallel ring attention over a mesh axis (shard_map + ppermute); "
                "kv_lengths for padding"))
register(KernelSpec(
    name="linear", fn=linear_attention, features=frozenset({"causal"}),
    automatic=False, semantics=linear.SEMANTICS, weights=linear_attention_weights,
    description="ELU+1 linear attention (not softmax; O(length), causal by a chunked "
                "scan); only when named"))

# Automatic dispatch, per platform the computation is lowered for: the first
# kernel that can run a call wins. The fused kernels lead; the materialised
# ones catch what they cannot express (dense masks, biases, dropout, weights).
# score_mod / mask_mod run fused in pallas on GPU and TPU where they can be
# lowered (pallas_refusal says when not); the rest reach blockwise (plain
# JAX, O(length) memory) on every platform before the materialised reference.
set_preference("cpu", ["blockwise", "jax_nn", "reference"])
set_preference("gpu", ["cudnn", "pallas", "jax_nn", "blockwise", "reference"])
set_preference("tpu", ["splash", "pallas", "jax_nn", "blockwise", "reference"])

__all__ = [
    "FEATURES", "KernelSpec", "PLATFORMS", "attention_fn", "attention_weights",
    "blockwise_attention", "capabilities", "check_supported", "checks", "cudnn_available",
    "dot_product_attention", "get", "jax_nn_attention", "linear", "linear_attention",
    "linear_attention_weights", "masks", "mods", "names",
    "pallas_attention", "preference", "reference_attention", "register",
    "requested_features", "ring_attention", "select", "set_preference", "softmax",
    "splash_attention",
]
