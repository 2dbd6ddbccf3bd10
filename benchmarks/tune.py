"""Tunes the CPU kernels for this machine and caches the result per user.

    python benchmarks/tune.py                  # full and causal, 1,024-4,096 keys, head_dim 64 and 32
    python benchmarks/tune.py --nowrite        # measure and print only
    python benchmarks/tune.py --quick          # tiny sizes: checks the script

For each shape class (full or banded attention, key-length class, head-dim
class: ``kernels.tuning.shape_class``) it times ``blockwise`` forward+backward
with every ``--block_qs`` x ``--block_ks`` pair side by side (one process,
rounds rotated, medians with the min-max spread) and keeps the fastest. Then
the cut-over: at each ``--cutover_lengths`` it times ``blockwise`` (with the
tuned blocks) against the materialised ``jax_nn``, full and causal, and keeps
the shortest length from which ``blockwise`` is faster in both (the geometric
mean of the two ratios above 1) at every longer length measured. Both are
written to the cache ``kernels.tuning`` reads (``--cache``, default
``$ATTENTION_LAB_TUNING`` or ``~/.cache/attention_lab/cpu_tuning.json``)
under this machine's key, so every later process on this CPU, with this many
CPUs and this jax, uses them. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import timing  # noqa: E402

flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "sequence lengths to tune blocks for")
flags.DEFINE_list("head_dims", ["64", "32"], "head dims to tune for")
flags.DEFINE_list("modes", ["full", "causal"], "full and/or causal (causal stands for banded)")
flags.DEFINE_list("block_qs", ["64", "128", "256"], "query block candidates")
flags.DEFINE_list("block_ks", ["256", "512", "1024", "2048"], "key block candidates")
flags.DEFINE_list("cutover_lengths", ["128", "256", "512", "1024"],
                  "lengths at which blockwise is timed against jax_nn for the cut-over")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("repeats", 3, "timed rounds (median, min-max)")
flags.DEFINE_integer("threads", 0, "CPUs to pin the process to; 0: all it may use")
flags.DEFINE_bool("write", True, "write the tuned settings to the cache")
flags.DEFINE_string("cache", None, "cache file (default: kernels.tuning.cache_path())")
flags.DEFINE_bool("quick", False, "tiny sizes and few rounds (seconds): checks the script runs")
FLAGS = flags.FLAGS

QUICK = {"lengths": ["128"], "head_dims": ["16"], "block_qs": ["32", "64"],
         "block_ks": ["64", "128"], "cutover_lengths": ["64", "128"], "heads": 2,
         "repeats": 3}


def _round8(n: int) -> int:
  return -(-n // 8) * 8


def _loss(causal: bool, **kernel_kw):
  """jitted value-and-grad of ``sum(attention)`` under a named kernel."""
  import jax
  from attention_lab import kernels
  def loss(q, k, v):
    out = kernels.dot_product_attention(q, k, v, is_causal=causal, **kernel_kw)
    return out.astype("float32").sum()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _inputs(length: int, head_dim: int):
  import jax
  shape = (FLAGS.batch, length, FLAGS.heads, head_dim)
  return [jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(0), 3)]


def _candidates(length: int):
  """Distinct (block_q, block_k) pairs once clipped to the length."""
  seen = []
  for bq in map(int, FLAGS.block_qs):
    for bk in map(int, FLAGS.block_ks):
      pair = (min(bq, _round8(length)), min(bk, _round8(length)))
      if pair not in seen:
        seen.append(pair)
  return seen


def tune_blocks(mode: str, length: int, head_dim: int):
  """``(best pair, {pair: Spread})`` of blockwise forward+backward."""
  import jax
  from attention_lab.kernels import blockwise
  args = _inputs(length, head_dim)
  causal = mode == "causal"
  fns = {}
  for bq, bk in _candidates(length):
    f = _loss(causal, implementation="blockwise", block_q=bq, block_k=bk)
    fns[(bq, bk)] = lambda f=f: jax.block_until_ready(f(*args))
  default = tuple(min(b, _round8(length)) for b in blockwise.DEFAULT_BLOCKS[causal])
  if default not in fns:
    f = _loss(causal, implementation="blockwise", block_q=default[0], block_k=default[1])
    fns[default] = lambda f=f: jax.block_until_ready(f(*args))
  spreads, failed = timing.time_rotating(fns, FLAGS.repeats)
  for pair, why in failed.items():
    print(f"  {pair}: failed: {why}")
  best = min(spreads, key=lambda p: spreads[p].median)
  return best, default, spreads


def cutover(best_blocks):
  """``(min length, rows)``: where blockwise (tuned) beats jax_nn, full and causal."""
  import jax
  rows, wins = [], []
  for length in map(int, FLAGS.cutover_lengths):
    ratios = []
    for mode in FLAGS.modes:
      causal = mode == "causal"
      args = _inputs(length, int(FLAGS.head_dims[0]))
      pair = best_blocks.get((mode, length, int(FLAGS.head_dims[0])))
      kw = {} if pair is None else {"block_q": pair[0], "block_k": pair[1]}
      fb, fj = _loss(causal, implementation="blockwise", **kw), _loss(causal, implementation="jax_nn")
      spreads, _ = timing.time_rotating(
          {"blockwise": lambda: jax.block_until_ready(fb(*args)),
           "jax_nn": lambda: jax.block_until_ready(fj(*args))}, FLAGS.repeats)
      ratio = spreads["jax_nn"].median / spreads["blockwise"].median
      ratios.append(ratio)
      rows.append(f"| {length} | {mode} | {spreads['blockwise'].ms()} | {spreads['jax_nn'].ms()} "
                  f"| {ratio:.2f} |")
    wins.append((length, math.exp(sum(map(math.log, ratios)) / len(ratios)) > 1.0))
  chosen = None
  for length, win in reversed(wins):      # the shortest length of the winning tail
    if not win:
      break
    chosen = length
  if chosen is None:                      # blockwise never wins: beyond the longest measured
    chosen = 2 * wins[-1][0]
  return chosen, rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.quick:
    timing.apply_quick(FLAGS, QUICK)
  threads, _ = timing.pin_threads(FLAGS.threads)
  import jax
  from attention_lab.kernels import tuning
  key = tuning.machine_key()
  print(f"machine: {timing.cpu_description()}; {threads} CPUs; jax {jax.__version__}")
  print(f"cache key: {key}")
  print(f"blockwise forward+backward, batch {FLAGS.batch}, {FLAGS.heads} heads, float32; "
        f"ms as median (min-max) of {FLAGS.repeats} rounds, order rotated")
  print("| class | length | best blocks | best ms | default blocks | default ms | speed-up |")
  print("|---|---|---|---|---|---|---|")
  table, best_blocks = {}, {}
  for mode in FLAGS.modes:
    for head_dim in map(int, FLAGS.head_dims):
      for length in map(int, FLAGS.lengths):
        best, default, spreads = tune_blocks(mode, length, head_dim)
        best_blocks[(mode, length, head_dim)] = best
        table[tuning.shape_class(mode != "full", length, head_dim)] = best
        print(f"| {tuning.shape_class(mode != 'full', length, head_dim)} | {length} "
              f"| {best[0]} x {best[1]} | {spreads[best].ms()} | {default[0]} x {default[1]} "
              f"| {spreads[default].ms()} | {spreads[default].median / spreads[best].median:.2f} |")
        others = ", ".join(f"{p[0]}x{p[1]} {s.median * 1e3:.1f}" for p, s in
                           sorted(spreads.items(), key=lambda kv: kv[1].median))
        print(f"  (all, ms: {others})")
  min_len, rows = cutover(best_blocks)
  print(f"\nblockwise (tuned) against jax_nn, forward+backward, head_dim {FLAGS.head_dims[0]}")
  print("| length | mode | blockwise ms | jax_nn ms | jax_nn ms / blockwise ms |")
  print("|---|---|---|---|---|")
  print("\n".join(rows))
  print(f"dispatch cut-over: blockwise from {min_len} keys")
  if FLAGS.write:
    path = FLAGS.cache or tuning.cache_path()
    if path is None:
      raise SystemExit(f"tune.py: {tuning.ENV}=off and no --cache: nowhere to write")
    tuning.store(path, key, table, min_len)
    print(f"written to {path} under {key!r}")


if __name__ == "__main__":
  app.run(main)
