"""How close blockwise's forward comes to the matrix products it is made of.

    python benchmarks/roofline.py                     # 2,048 tokens, 8 heads, head_dim 64
    python benchmarks/roofline.py --length=4096 --head_dim=32
    python benchmarks/roofline.py --layouts           # and the products in other operand layouts
    python benchmarks/roofline.py --quick             # tiny sizes: checks the script runs

``benchmarks/kernels.py`` gives each kernel as a fraction of a square
float32 matmul's speed. That peak is out of reach for attention if XLA's
products at attention's shapes (a ``[block_q, head_dim] x [head_dim, block_k]``
score block per head, then ``[block_q, block_k] x [block_k, value_dim]``)
run slower than a square matmul. This script times, side by side in one
process (rounds rotated, medians with the min-max spread), the same block
loop as ``blockwise`` with:

- ``products only``: the two products per block and nothing else;
- ``products + max/exp``: with each block's row max and ``exp`` between them;
- ``blockwise``: the kernel itself (online softmax, rescaling, masking
  bookkeeping) at the same blocks;
- ``one product pair``: the two products on the whole ``[length, length]``
  score matrix (no blocks);
- with ``--layouts``, the first two again with the block products' operands
  laid out otherwise (``LAYOUTS``): whether the products' ceiling is a
  matter of layout.

GFLOP/s count the forward's ``4 * heads * length^2 * head_dim``; ``of peak``
divides by the square matmul measured in the same process.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import timing  # noqa: E402
from benchmarks.block_loops import LAYOUTS  # noqa: E402
from benchmarks.block_loops import block_loop  # noqa: E402

flags.DEFINE_integer("length", 2048, "sequence length (queries = keys)")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("head_dim", 64, "head dim")
flags.DEFINE_integer("block_q", 128, "query block")
flags.DEFINE_integer("block_k", 1024, "key block")
flags.DEFINE_integer("repeats", 9, "timed rounds (median, min-max)")
flags.DEFINE_integer("peak_size", 2048, "side of the square matmul that measures the peak")
flags.DEFINE_integer("threads", 0, "CPUs to pin the process to; 0: all it may use")
flags.DEFINE_bool("layouts", False, "also time the block products in the other operand layouts "
                  "(LAYOUTS), products only and with the max/exp")
flags.DEFINE_bool("quick", False, "tiny sizes and few rounds (seconds): checks the script runs")
FLAGS = flags.FLAGS

QUICK = {"length": 256, "heads": 2, "head_dim": 16, "block_q": 64, "block_k": 128,
         "repeats": 3, "peak_size": 256}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.quick:
    timing.apply_quick(FLAGS, QUICK)
  _, cpus = timing.pin_threads(FLAGS.threads)
  import jax
  import jax.numpy as jnp
  from attention_lab.kernels.blockwise import blockwise_attention

  length, bq, bk = FLAGS.length, FLAGS.block_q, FLAGS.block_k
  if length % bq or length % bk:
    raise app.UsageError(f"--length={length} must be a multiple of --block_q={bq} and --block_k={bk}")
  print(f"machine: {timing.cpu_description()}; {len(cpus)} of {os.cpu_count()} CPUs used; "
        f"jax {jax.__version__}")
  shape = (1, FLAGS.heads, length, FLAGS.head_dim)
  q, k, v = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 3))
  heads_last = lambda x: x.swapaxes(1, 2)
  fns = {
      "products only": jax.jit(lambda q, k, v: block_loop(q, k, v, bq, bk, False)),
      "products + max/exp": jax.jit(lambda q, k, v: block_loop(q, k, v, bq, bk, True)),
      "blockwise": jax.jit(lambda q, k, v: blockwise_attention(
          heads_last(q), heads_last(k), heads_last(v), block_q=bq, block_k=bk)),
      "one product pair": jax.jit(lambda q, k, v: jnp.einsum(
          "bnqk,bnkd->bnqd", jnp.einsum("bnqd,bnkd->bnqk", q, k), v)),
  }
  for layout in LAYOUTS[1:] if FLAGS.layouts else ():
    for with_exp in (False, True):
      name = f"{layout}{' + max/exp' if with_exp else ''}"
      fns[name] = jax.jit(lambda q, k, v, layout=layout, with_exp=with_exp: block_loop(
          q, k, v, bq, bk, with_exp, layout))
  spreads, failed = timing.time_rotating(
      {name: (lambda f=f: jax.block_until_ready(f(q, k, v))) for name, f in fns.items()},
      FLAGS.repeats)
  peak = timing.peak_gflops(timing.matmul_peak(FLAGS.peak_size, FLAGS.repeats), FLAGS.peak_size)
  flops = 4 * FLAGS.heads * length * length * FLAGS.head_dim
  print(f"forward, {length} tokens, {FLAGS.heads} heads, head_dim {FLAGS.head_dim}, blocks "
        f"{bq} x {bk}, float32; square matmul {FLAGS.peak_size}: {peak:.0f} GFLOP/s; ms as "
        f"median (min-max) of {FLAGS.repeats} rounds, order rotated")
  print("| candidate | ms | GFLOP/s | of peak | vs products only |")
  print("|---|---|---|---|---|")
  base = spreads["products only"].median
  for name, spread in spreads.items():
    rate = flops / spread.median / 1e9
    print(f"| {name} | {spread.ms()} | {rate:.0f} | {rate / peak:.2f} | "
          f"{base / spread.median:.2f} |")
  for name, why in failed.items():
    print(f"| {name} | failed: {why} | - | - | - |")


if __name__ == "__main__":
  app.run(main)
