"""Ring attention on 4 and 8 simulated CPU devices against float64 attention
written out here.

The device count of a process is fixed when JAX starts, so each case runs in a
subprocess with ``--xla_force_host_platform_device_count``.
"""

import jax
import jax.numpy as jnp
import pytest

from attention_lab import kernels
from conftest import run_on_devices


RING_CHECK = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from attention_lab.kernels import ring
assert jax.device_count() == {devices}
mesh = jax.make_mesh(({data}, {devices} // {data}), ("data", "sequence"))
rng = np.random.default_rng(0)

def softmax_attention64(q, k, v, visible):
  # float64 attention over visible [b, 1, t, s], written here; a row with no
  # visible key gives zeros (the kernels' contract) and zero gradients.
  s = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(visible, s, -jnp.inf)
  top = jax.lax.stop_gradient(s.max(-1, keepdims=True))
  w = jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0))
  total = w.sum(-1, keepdims=True)
  return jnp.einsum("bnts,bsnd->btnd", w / jnp.where(total > 0, total, 1.0), v)

worst = {{}}
for dtype, tol in (("float64", 1e-10), ("float32", 2e-5), ("bfloat16", 3e-2)):
  for causal in (False, True):
    for length in (24, 13, 5):          # divisible by the ring, not, shorter than it
      q, k, v = (jnp.asarray(rng.normal(size=(4, length, 2, 8)), dtype) for _ in range(3))
      # unpadded, padded, all padding (the row sees no key), half padded
      lengths = jnp.array([length, max(length - 4, 1), 0, length // 2])
      i, j = np.arange(length)[:, None], np.arange(length)[None, :]
      visible = (j <= i if causal else np.ones((length, length), bool))[None, None] & (
          j[None, None] < np.asarray(lengths)[:, None, None, None])
      def ours(q, k, v):
        # chunk=4: blocks of 6 or 7 keys per device are folded in padded chunks of 4.
        return ring.ring_attention(q, k, v, is_causal=causal, kv_lengths=lengths, mesh=mesh,
                                   chunk=4)
      def ref(q, k, v):
        up = lambda x: x.astype(jnp.float64)
        return softmax_attention64(up(q), up(k), up(v), visible)
      out = jax.jit(ours)(q, k, v)
      assert out.dtype == q.dtype and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
      assert not np.asarray(out.astype(jnp.float32))[2].any(), (dtype, causal, length)  # no key: zeros
      err = float(jnp.abs(out.astype(jnp.float64) - ref(q, k, v)).max())
      cot = jnp.asarray(rng.normal(size=out.shape))
      loss = lambda f: lambda q, k, v: (f(q, k, v).astype(jnp.float64) * cot).sum()
      got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
      want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
      assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in got), (dtype, causal)
      gerr = max(float(jnp.abs(a.astype(jnp.float64) - b).max()) for a, b in zip(got, want))
      scale = 1 + float(max(jnp.abs(b).max() for b in want))
      assert err < tol and gerr < tol * scale, (dtype, causal, length, err, gerr)
      worst[dtype] = max(worst.get(dtype, 0), err, gerr / scale)
print("worst", worst)
"""


# The 8-device case covers the 4-device one (and adds a data axis); the
# default suite keeps it alone to stay within its time budget.
@pytest.mark.parametrize("devices,data", [pytest.param(4, 1, marks=pytest.mark.slow), (8, 2)])
def test_ring_matches_reference_on_simulated_devices(devices, data):
  """Forward and gradients, causal or not, lengths that do not divide by the
  ring or by the chunk, padding with an all-padding row (zeros out, finite
  gradients), float64/float32/bfloat16; on 8 devices the batch is also split
  over a data axis of 2."""
  out = run_on_devices(devices, RING_CHECK.format(devices=devices, data=data))
  assert "worst" in out


def test_ring_window_and_mesh_from_context():
  out = run_on_devices(4, """
    import jax, jax.numpy as jnp, numpy as np
    from attention_lab import kernels
    from attention_lab.kernels import reference
    mesh = jax.make_mesh((4,), ("sequence",))
    q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(1, 19, 2, 8)), jnp.float32)
               for i in range(3))
    with jax.set_mesh(mesh):   # no mesh= argument: the ring finds the mesh in context
      out = jax.jit(lambda q, k, v: kernels.dot_product_attention(
          q, k, v, is_causal=True, local_window_size=(3, 0), implementation="ring"))(q, k, v)
    ref = reference.reference_attention(q, k, v, is_causal=True, local_window_size=(3, 0))
    print("err", float(jnp.abs(out - ref).max()))
  """)
  assert float(out.split("err")[1]) < 2e-5


def test_ring_is_named_only_and_explains_what_it_needs():
  spec = kernels.get("ring")
  assert not spec.automatic and spec.supports("causal") and not spec.supports("mask")
  assert "ring" not in [kernels.select(frozenset({"causal"})).name]
  q = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="needs a device mesh with a 'sequence' axis"):
    kernels.dot_product_attention(q, q, q, implementation="ring")
  with pytest.raises(ValueError, match="does not support 'mask'"):
    kernels.dot_product_attention(q, q, q, mask=jnp.ones((8, 8), bool), implementation="ring")
  mesh = jax.make_mesh((1,), ("sequence",))
  with pytest.raises(ValueError, match="q_length == kv_length"):
    kernels.ring_attention(q, q[:, :4], q[:, :4], mesh=mesh)
