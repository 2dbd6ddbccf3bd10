"""Attention kernel speed and memory tables.

    python benchmarks/kernels.py                       # speed, lengths 512..8192, then memory
    python benchmarks/kernels.py --lengths=1024 --repeats=3 --memory_lengths=

Speed: for each length, every registered kernel, ``jax.nn.dot_product_attention``
and (if installed) PyTorch's ``scaled_dot_product_attention`` run forward and
forward+backward, interleaved round by round so machine noise hits all of them
alike; the table gives the median milliseconds, GFLOP/s and ``torch ms / ms``
(above 1.0 = faster than torch).

FLOPs: forward ``4 * batch * heads * q_length * kv_length * head_dim`` (two
matrix products), halved for causal; forward+backward counts 3x the forward
(the backward's four products are twice the forward's two), whether or not a
kernel recomputes.

Memory: each (kernel, length) runs causal forward+backward in a fresh
subprocess and reports its peak resident memory (``VmHWM``), which
includes the Python/JAX runtime (about 0.3-0.5 GiB on its own).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192"], "sequence lengths for speed")
flags.DEFINE_list("memory_lengths", ["16384", "32768", "65536"], "lengths for the memory table")
flags.DEFINE_list("kernels", [], "kernels to time (default: all registered)")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("head_dim", 64, "head width")
flags.DEFINE_integer("repeats", 5, "timed rounds per measurement (median reported)")
flags.DEFINE_bool("causal", False, "causal attention in the speed table")
flags.DEFINE_bool("backward", True, "also time forward+backward")
flags.DEFINE_bool("torch", True, "compare with torch SDPA when torch is installed")
flags.DEFINE_float("max_dense_gib", 12.0, "skip materialising kernels whose score matrices exceed this")
flags.DEFINE_string("_memory_child", "", "internal: run one memory measurement")
FLAGS = flags.FLAGS

MATERIALISING = {"reference", "jax_nn", "jax.nn"}


def _flops(length, causal):
  f = 4 * FLAGS.batch * FLAGS.heads * length * length * FLAGS.head_dim
  return f / 2 if causal else f


def _jax_fns(name, causal):
  import jax
  import jax.numpy as jnp
  from attention_lab import kernels

  if name == "jax.nn":
    fwd = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  else:
    fwd = lambda q, k, v: kernels.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation=name)
  loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
  fwd_jit = jax.jit(fwd)
  bwd_jit = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  run_fwd = lambda args: jax.block_until_ready(fwd_jit(*args))
  run_bwd = lambda args: jax.block_until_ready(bwd_jit(*args))
  return run_fwd, run_bwd


def _jax_inputs(length):
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0), 3)
  shape = (FLAGS.batch, length, FLAGS.heads, FLAGS.head_dim)
  return tuple(jax.random.normal(k, shape, jnp.float32) for k in keys)


def _torch_fns(causal):
  import torch
  import torch.nn.functional as F

  def fwd(args):
    with torch.no_grad():
      return F.scaled_dot_product_attention(*args, is_causal=causal)

  def bwd(args):
    q, k, v = (a.detach().requires_grad_() for a in args)
    F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    return q.grad

  return fwd, bwd


def _torch_inputs(length):
  import torch
  g = torch.Generator().manual_seed(0)
  shape = (FLAGS.batch, FLAGS.heads, length, FLAGS.head_dim)   # torch is heads-major
  return tuple(torch.randn(shape, generator=g) for _ in range(3))


def _time_round_robin(candidates, args_for, repeats):
  """candidates: {name: fn}. Warm-up (compile) once, then ``repeats`` rounds."""
  times = {name: [] for name in candidates}
  for name, fn in candidates.items():
    fn(args_for[name])
  for _ in range(repeats):
    for name, fn in candidates.items():
      start = time.perf_counter()
      fn(args_for[name])
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def speed_table():
  from attention_lab import kernels
  names = FLAGS.kernels or kernels.names()
  names = list(names) + ["jax.nn"]
  have_torch = False
  if FLAGS.torch:
    try:
      import torch
      torch.manual_seed(0)
      have_torch = True
    except ImportError:
      print("(torch not installed: no torch column)")
  causal = FLAGS.causal
  if not FLAGS.lengths:
    return []
  print(f"\nspeed: batch {FLAGS.batch}, heads {FLAGS.heads}, head_dim {FLAGS.head_dim}, "
        f"float32, {'causal' if causal else 'full'} attention, median of {FLAGS.repeats}")
  header = f"| length | kernel | fwd ms | fwd GFLOP/s | fwd vs torch |"
  if FLAGS.backward:
    header += " fwd+bwd ms | fwd+bwd GFLOP/s | fwd+bwd vs torch |"
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  rows = []
  for length in map(int, FLAGS.lengths):
    dense_gib = FLAGS.batch * FLAGS.heads * length * length * 4 / 2**30
    jax_args = _jax_inputs(length)
    fwd, bwd, args = {}, {}, {}
    for name in names:
      if name in MATERIALISING and dense_gib * 3 > FLAGS.max_dense_gib:
        continue
      fwd[name], bwd[name] = _jax_fns(name, causal)
      args[name] = jax_args
    if have_torch:
      fwd["torch"], bwd["torch"] = _torch_fns(causal)
      args["torch"] = _torch_inputs(length)
    repeats = FLAGS.repeats
    f_times = _time_round_robin(fwd, args, repeats)
    b_times = _time_round_robin(bwd, args, repeats) if FLAGS.backward else {}
    flops = _flops(length, causal)
    for name in fwd:
      row = {"length": length, "kernel": name, "fwd_ms": f_times[name] * 1e3,
             "fwd_gflops": flops / f_times[name] / 1e9}
      line = f"| {length} | {name} | {row['fwd_ms']:.1f} | {row['fwd_gflops']:.1f} | "
      line += f"{f_times['torch'] / f_times[name]:.2f} |" if have_torch else "- |"
      if FLAGS.backward:
        row.update(bwd_ms=b_times[name] * 1e3, bwd_gflops=3 * flops / b_times[name] / 1e9)
        line += f" {row['bwd_ms']:.1f} | {row['bwd_gflops']:.1f} | "
        line += f"{b_times['torch'] / b_times[name]:.2f} |" if have_torch else "- |"
      print(line, flush=True)
      rows.append(row)
  return rows


def _memory_child(spec):
  """Runs one causal forward+backward and prints peak RSS in bytes (JSON)."""
  name, length = spec.split(":")
  length = int(length)
  if name == "torch":
    import torch
    fwd, bwd = _torch_fns(True)
    bwd(_torch_inputs(length))
  else:
    fwd, bwd = _jax_fns(name, True)
    bwd(_jax_inputs(length))
  print(json.dumps({"peak_bytes": _peak_rss_bytes()}))


def _peak_rss_bytes():
  """This process's high-water resident set (VmHWM).

  Not ``ru_maxrss``: Linux carries that across ``execve``, so a child started
  by a large parent would report the parent's peak.
  """
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_table():
  from attention_lab import kernels
  lengths = [int(x) for x in FLAGS.memory_lengths if x]
  if not lengths:
    return
  names = [n for n in (FLAGS.kernels or kernels.names()) if n not in MATERIALISING]
  if FLAGS.torch:
    try:
      import torch  # noqa: F401
      names.append("torch")
    except ImportError:
      pass
  print(f"\npeak resident memory, causal forward+backward, batch {FLAGS.batch}, "
        f"heads {FLAGS.heads}, head_dim {FLAGS.head_dim}, float32 (own process each)")
  print("| length | kernel | peak GiB | seconds |")
  print("|---|---|---|---|")
  for length in lengths:
    for name in names:
      start = time.perf_counter()
      proc = subprocess.run(
          [sys.executable, os.path.abspath(__file__), f"--_memory_child={name}:{length}",
           f"--batch={FLAGS.batch}", f"--heads={FLAGS.heads}", f"--head_dim={FLAGS.head_dim}"],
          capture_output=True, text=True)
      took = time.perf_counter() - start
      if proc.returncode:
        print(f"| {length} | {name} | failed ({proc.stderr.strip().splitlines()[-1][:80]}) | {took:.0f} |")
        continue
      peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
      print(f"| {length} | {name} | {peak / 2**30:.2f} | {took:.0f} |", flush=True)


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if FLAGS._memory_child:
    _memory_child(FLAGS._memory_child)
    return
  import jax
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs")
  speed_table()
  memory_table()


if __name__ == "__main__":
  app.run(main)
