"""Per-device memory of ring attention as the sequence is split over more devices.

  python benchmarks/ring.py                      # 16,384 tokens, 1 to 8 devices
  python benchmarks/ring.py --length=32768 --devices=1,2,4,8,16

Runs on simulated CPU devices (``--xla_force_host_platform_device_count``),
which share this machine's cores: times would say nothing, so the table
reports what XLA's compiler allots per device for the jitted causal forward
and backward (arguments, outputs and scratch from ``memory_analysis()``), the
same numbers on a real mesh of that size. The single-device ``blockwise``
kernel is the baseline.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("length", 16384, "sequence length")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("head_dim", 64, "head width")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "ring sizes to compile for")


def _per_device_bytes(fn, *args) -> int:
  import jax
  compiled = jax.jit(fn).lower(*args).compile()
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def main(argv):
  del argv
  sizes = [int(n) for n in FLAGS.devices]
  if "XLA_FLAGS" not in os.environ or "device_count" not in os.environ["XLA_FLAGS"]:
    # The device count is fixed when JAX starts: re-run with enough devices.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(sizes)}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.execv(sys.executable, [sys.executable] + sys.argv)

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import jax.numpy as jnp
  from attention_lab import kernels

  shape = (1, FLAGS.length, FLAGS.heads, FLAGS.head_dim)
  q = k = v = jax.ShapeDtypeStruct(shape, jnp.float32)

  def loss_of(attention):
    def loss(q, k, v):
      return attention(q, k, v).astype(jnp.float32).sum()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))

  base = _per_device_bytes(loss_of(lambda q, k, v: kernels.blockwise_attention(
      q, k, v, is_causal=True)), q, k, v)
  print(f"causal forward+backward, batch 1, {FLAGS.heads} heads, head_dim {FLAGS.head_dim}, "
        f"{FLAGS.length:,} tokens, float32; per-device bytes from XLA's memory_analysis\n")
  print("| kernel | devices | tokens per device | memory per device | vs blockwise on 1 |")
  print("|---|---|---|---|---|")
  print(f"| blockwise | 1 | {FLAGS.length:,} | {base / 2**20:,.1f} MiB | 1.00 |")
  for n in sizes:
    if n > jax.device_count():
      raise SystemExit(f"asked for {n} devices, have {jax.device_count()}")
    mesh = jax.make_mesh((n,), ("sequence",), devices=jax.devices()[:n])
    ring = loss_of(lambda q, k, v: kernels.ring_attention(q, k, v, is_causal=True, mesh=mesh))
    used = _per_device_bytes(ring, q, k, v)
    print(f"| ring | {n} | {-(-FLAGS.length // n):,} | {used / 2**20:,.1f} MiB | "
          f"{used / base:.2f} |")


if __name__ == "__main__":
  app.run(main)
