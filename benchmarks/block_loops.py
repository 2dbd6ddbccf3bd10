"""The block loop ``benchmarks/roofline.py`` times: blockwise's loop structure
with only its two matrix products, in several operand layouts.

Flag-free (``roofline.py`` owns the flags), so tests import it beside other
benchmark scripts.
"""

from __future__ import annotations


# Operand layouts of the two block products. "as stored" is blockwise's:
# scores ``qk^T`` with keys sliced from ``[heads, length, head_dim]``.
# "keys pre-blocked" lays keys out as ``[blocks, heads, head_dim, block_k]``
# and values as ``[blocks, heads, block_k, head_dim]`` once, before the loop,
# so each product reads one contiguous block in the order its contraction
# wants. "keys-major scores" computes the scores transposed,
# ``[block_k, block_q]``, and the output transposed, ``[head_dim, block_q]``
# (values pre-blocked as ``[blocks, heads, head_dim, block_k]``): the one
# pairing of layouts that ran fastest as lone products on this project's CPU.
LAYOUTS = ("as stored", "keys pre-blocked", "keys-major scores")


def block_loop(q, k, v, block_q: int, block_k: int, with_exp: bool, layout: str = "as stored"):
  """blockwise's loop structure (``lax.map`` over query blocks, ``fori_loop``
  over key blocks) with only the two products (and optionally the max/exp).

  q, k, v: ``[1, heads, length, head_dim]``; returns
  ``[n_q_blocks, 1, heads, block_q, head_dim]`` (``[..., head_dim, block_q]``
  for "keys-major scores").
  """
  import jax.numpy as jnp
  from jax import lax
  _, heads, length, dim = k.shape
  n_k = length // block_k
  blocks = lambda x: x.reshape(1, heads, n_k, block_k, dim).transpose(2, 0, 1, 3, 4)
  if layout == "as stored":
    take = lambda x, t: lax.dynamic_slice_in_dim(x, t * block_k, block_k, axis=2)
    specs, reduce_axis, acc_shape = ("bnqd,bnkd->bnqk", "bnqk,bnkd->bnqd"), -1, (block_q, dim)
  elif layout == "keys pre-blocked":
    take = lambda x, t: lax.dynamic_index_in_dim(x, t, 0, keepdims=False)
    k, v = blocks(k).swapaxes(3, 4), blocks(v)
    specs, reduce_axis, acc_shape = ("bnqd,bndk->bnqk", "bnqk,bnkd->bnqd"), -1, (block_q, dim)
  elif layout == "keys-major scores":
    take = lambda x, t: lax.dynamic_index_in_dim(x, t, 0, keepdims=False)
    k, v = blocks(k), blocks(v).swapaxes(3, 4)
    specs, reduce_axis, acc_shape = ("bnqd,bnkd->bnkq", "bnkq,bndk->bndq"), -2, (dim, block_q)
  else:
    raise ValueError(f"block_loop: unknown layout {layout!r}; one of {LAYOUTS}")

  def query_block(qi):
    qb = lax.dynamic_slice_in_dim(q, qi * block_q, block_q, axis=2)

    def body(t, acc):
      s = jnp.einsum(specs[0], qb, take(k, t))
      if with_exp:
        s = jnp.exp(s - s.max(reduce_axis, keepdims=True))
      return acc + jnp.einsum(specs[1], s, take(v, t))

    return lax.fori_loop(0, n_k, body, jnp.zeros((1, heads) + acc_shape, jnp.float32))

  return lax.map(query_block, jnp.arange(length // block_q))
