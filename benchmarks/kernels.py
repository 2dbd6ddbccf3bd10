"""Attention kernel speed and memory tables, with the machine they came from.

    python benchmarks/kernels.py                  # lengths 512..8192, then compiled memory
    python benchmarks/kernels.py --quick          # tiny sizes and rounds: checks the script
    python benchmarks/kernels.py --lengths=1024 --repeats=5 --memory_lengths= --threads=1

First the machine: CPU model and the flags that decide matmul speed
(``avx512f``, ``avx512_bf16``, ``amx``), jax and torch versions, and the
threads each library may use (``--threads``, default every CPU this process
may run on: the process is pinned to that many CPUs, which is what XLA sizes
its intra-op pool from, ``--xla_cpu_multi_thread_eigen=false`` when 1, and
``torch.set_num_threads``; torch's OpenMP workers wait passively, not
spinning on the CPUs XLA needs next, unless ``OMP_WAIT_POLICY`` is set).
Then XLA's matmul peak on this machine, in this process: GFLOP/s of a
``--peak_size`` square matmul in ``--dtype``, median of the rounds, measured
before and after the tables (a drift between the two means the machine's load
changed: rerun).

Speed: for each length, every kernel that can run here, plain
``jax.nn.dot_product_attention`` and (if importable) PyTorch's
``scaled_dot_product_attention`` run forward and forward+backward. After one
compile/warm-up call each, ``--repeats`` rounds time every candidate once,
the order rotating by one each round so no kernel always runs first or right
after another. A cell gives median milliseconds with the min-max spread,
GFLOP/s, the fraction of the matmul peak, and ``torch ms / ms`` (above 1.0 =
faster than torch), marked "within noise" when the two spreads overlap.

Kernels that cannot run here are listed with the reason, never timed into a
crash: a platform they do not run on (``cudnn`` GPU, ``splash`` TPU), a dtype
they lack, ``ring`` (needs a device mesh with a sequence axis:
``benchmarks/ring.py`` measures it), and ``pallas`` on CPU (Pallas'
interpreter, far slower than everything else: timed only when named in
``--kernels``). A candidate that raises in warm-up is listed as failed.

FLOPs: forward ``4 * batch * heads * q_length * kv_length * head_dim`` (two
matrix products), halved for causal; forward+backward counts 3x the forward
(the backward's four products are twice the forward's two), whether or not a
kernel recomputes.

Memory: XLA's compiled memory analysis of causal forward+backward (temp
bytes: the kernel's own working memory; arguments and outputs apart), from
compiling on abstract shapes, so nothing is allocated and the materialising
kernels are shown at lengths they could never run at. torch has no such
analysis; ``--process_memory_lengths`` adds the old whole-process peak
(``VmHWM``, runtime included) for every candidate and torch, each in a fresh
process.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import timing  # noqa: E402
from benchmarks.timing import Spread  # noqa: E402
from benchmarks.timing import cpu_description  # noqa: E402
from benchmarks.timing import pin_threads  # noqa: E402

flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192"], "sequence lengths for speed")
flags.DEFINE_list("memory_lengths", ["16384", "32768", "65536"],
                  "lengths for the compiled memory table (compiled only, never run)")
flags.DEFINE_list("process_memory_lengths", [],
                  "lengths for a whole-process peak memory table (runs each in a fresh process)")
flags.DEFINE_list("kernels", [], "kernels to time (default: all that can run here; "
                  "naming pallas times it on CPU too)")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("head_dim", 64, "head width")
flags.DEFINE_integer("repeats", 7, "timed rounds per measurement (min / median / max reported)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "inputs and matmul peak (cudnn needs bfloat16 or float16)")
flags.DEFINE_integer("threads", 0,
                     "CPU threads for XLA and torch; 0: every CPU this process may use")
flags.DEFINE_integer("peak_size", 2048, "side of the square matmul that measures the peak")
flags.DEFINE_bool("causal", False, "causal attention in the speed table")
flags.DEFINE_bool("backward", True, "also time forward+backward")
flags.DEFINE_bool("torch", True, "compare with torch SDPA when torch is importable")
flags.DEFINE_float("max_dense_gib", 12.0, "skip running materialising kernels whose score "
                   "matrices exceed this")
flags.DEFINE_bool("quick", False, "tiny sizes and few rounds (seconds): checks the script "
                  "runs, its numbers mean nothing")
flags.DEFINE_string("_memory_child", "", "internal: run one process memory measurement")
FLAGS = flags.FLAGS

# --quick: flags it sets unless given on the command line.
QUICK = {"lengths": ["256"], "memory_lengths": ["1024"], "heads": 2, "head_dim": 32,
         "repeats": 3, "peak_size": 256}
MATERIALISING = {"reference", "jax_nn", "jax.nn"}
PLAIN_JAX = "jax.nn"       # jax.nn.dot_product_attention itself, for comparison
TORCH_DEVICE = "cpu"       # set by import_torch to the device the JAX kernels use




# ---------------------------------------------------------------- the machine





def import_torch(threads: int, backend: str):
  """``(torch or None, why there is no torch column)``.

  torch runs on the device the JAX kernels run on (CPU, or CUDA on a GPU);
  a CPU torch against GPU kernels would compare machines, not kernels.
  """
  global TORCH_DEVICE
  if not FLAGS.torch:
    return None, "--notorch"
  try:
    import torch
  except ImportError:
    return None, "not importable"
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  if backend == "cpu":
    TORCH_DEVICE = "cpu"
  elif backend == "gpu" and torch.cuda.is_available():
    TORCH_DEVICE = "cuda"
  else:
    return None, f"{torch.__version__} has no device for {backend}"
  return torch, ""


def print_machine(threads: int, cpus: Sequence[int], torch, no_torch: str) -> None:
  import jax
  import jaxlib
  device = jax.devices()[0]
  print(f"machine: {cpu_description()}; {len(cpus)} of {os.cpu_count()} CPUs used; "
        f"jax {jax.__version__} (jaxlib {jaxlib.__version__}) on {jax.default_backend()} "
        f"({device.device_kind}); torch "
        + (f"{torch.__version__} on {TORCH_DEVICE}" if torch is not None
           else f"{no_torch}: no torch column"))
  eigen = "off" if "xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", "") else "on"
  print(f"threads: XLA {threads} (runs on CPUs {','.join(map(str, cpus))}, Eigen "
        f"multi-threading {eigen}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); torch "
        + (f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op, "
           f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}" if torch is not None else "-"))
  print(timing.tuning_line())


def matmul_peak(size: int, repeats: int) -> Spread:
  """Seconds of one ``size x size`` matmul in ``--dtype`` under XLA, per round."""
  return timing.matmul_peak(size, repeats, FLAGS.dtype)


peak_gflops = timing.peak_gflops


# ---------------------------------------------------------------- candidates

def skip_reason(name: str, backend: str, named: Sequence[str]) -> Optional[str]:
  """Why kernel ``name`` is not timed here, or None when it is."""
  from attention_lab import kernels
  try:
    spec = kernels.get(name)
  except ValueError as e:
    return str(e)
  if backend not in spec.platforms:
    return f"{'/'.join(spec.platforms)} only"
  if not spec.automatic:
    return ("needs a device mesh with a 'sequence' axis (benchmarks/ring.py measures it)"
            if name == "ring" else "runs only when named inside its own setting")
  if FLAGS.dtype not in spec.dtypes:
    return f"not for {FLAGS.dtype} (its dtypes: {', '.join(spec.dtypes)}; see --dtype)"
  if FLAGS.causal and not spec.supports("causal"):
    return "no causal attention"
  if name == "pallas" and backend == "cpu" and name not in named:
    return "Pallas' interpreter on CPU, far slower than every other kernel: name it in --kernels"
  return None


def choose_candidates(backend: str) -> Tuple[List[str], List[str]]:
  """``(names to time, "name (reason)" skipped)``; jax.nn is always a candidate."""
  from attention_lab import kernels
  named = list(FLAGS.kernels)
  chosen, skipped = [], []
  for name in named or kernels.names():
    if name == PLAIN_JAX:
      continue
    reason = skip_reason(name, backend, named)
    if reason:
      skipped.append(f"{name} ({reason})")
    else:
      chosen.append(name)
  return chosen + [PLAIN_JAX], skipped


def _flops(length, causal):
  f = 4 * FLAGS.batch * FLAGS.heads * length * length * FLAGS.head_dim
  return f / 2 if causal else f


def _jax_attention(name, causal):
  import jax
  from attention_lab import kernels
  if name == PLAIN_JAX:
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  return lambda q, k, v: kernels.dot_product_attention(q, k, v, is_causal=causal,
                                                       implementation=name)


def _jax_loss(name, causal):
  import jax.numpy as jnp
  fwd = _jax_attention(name, causal)
  return lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))


def _jax_fns(name, causal):
  import jax
  fwd_jit = jax.jit(_jax_attention(name, causal))
  bwd_jit = jax.jit(jax.grad(_jax_loss(name, causal), argnums=(0, 1, 2)))
  run_fwd = lambda args: jax.block_until_ready(fwd_jit(*args))
  run_bwd = lambda args: jax.block_until_ready(bwd_jit(*args))
  return run_fwd, run_bwd


def _shape(length):
  return (FLAGS.batch, length, FLAGS.heads, FLAGS.head_dim)


def _jax_inputs(length):
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(k, _shape(length), jnp.dtype(FLAGS.dtype)) for k in keys)


def _torch_fns(causal):
  import torch
  import torch.nn.functional as F
  # CUDA calls return before the work is done, like JAX's without block_until_ready.
  wait = torch.cuda.synchronize if TORCH_DEVICE == "cuda" else (lambda: None)

  def fwd(args):
    with torch.no_grad():
      out = F.scaled_dot_product_attention(*args, is_causal=causal)
    wait()
    return out

  def bwd(args):
    q, k, v = (a.detach().requires_grad_() for a in args)
    F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    wait()
    return q.grad

  return fwd, bwd


def _torch_inputs(length):
  import torch
  g = torch.Generator().manual_seed(0)
  shape = (FLAGS.batch, FLAGS.heads, length, FLAGS.head_dim)   # torch is heads-major
  dtype = getattr(torch, FLAGS.dtype)
  return tuple(torch.randn(shape, generator=g).to(TORCH_DEVICE, dtype) for _ in range(3))


def time_rotating(candidates: Dict[str, Callable], args_for: Dict[str, tuple],
                  repeats: int) -> Tuple[Dict[str, Spread], Dict[str, str]]:
  """``timing.time_rotating`` of each candidate called on its own arguments."""
  return timing.time_rotating(
      {name: functools.partial(fn, args_for[name]) for name, fn in candidates.items()}, repeats)


def _vs_torch(spreads: Dict[str, Spread], name: str) -> str:
  if "torch" not in spreads:
    return "-"
  ratio = spreads["torch"].median / spreads[name].median
  return f"{ratio:.2f}" + (" within noise" if name != "torch" and
                           spreads["torch"].overlaps(spreads[name]) else "")


# ---------------------------------------------------------------- tables

def speed_table(names: List[str], torch, peak: float) -> List[dict]:
  causal = FLAGS.causal
  lengths = [int(x) for x in FLAGS.lengths if x]
  if not lengths:
    return []
  print(f"\nspeed: batch {FLAGS.batch}, heads {FLAGS.heads}, head_dim {FLAGS.head_dim}, "
        f"{FLAGS.dtype}, {'causal' if causal else 'full'} attention; ms as median (min-max) "
        f"of {FLAGS.repeats} rounds, order rotated each round; 'of peak' = GFLOP/s / "
        f"{peak:.1f} (the matmul peak)")
  header = "| length | kernel | fwd ms | fwd GFLOP/s | fwd of peak | fwd vs torch |"
  if FLAGS.backward:
    header += " fwd+bwd ms | fwd+bwd GFLOP/s | fwd+bwd of peak | fwd+bwd vs torch |"
  print(header)
  print("|" + "---|" * (header.count("|") - 1), flush=True)
  rows = []
  for length in lengths:
    dense_gib = FLAGS.batch * FLAGS.heads * length * length * 4 / 2**30
    jax_args = _jax_inputs(length)
    fwd, bwd, args, too_big = {}, {}, {}, []
    for name in names:
      if name in MATERIALISING and dense_gib * 3 > FLAGS.max_dense_gib:
        too_big.append(name)
        continue
      fwd[name], bwd[name] = _jax_fns(name, causal)
      args[name] = jax_args
    if torch is not None:
      fwd["torch"], bwd["torch"] = _torch_fns(causal)
      args["torch"] = _torch_inputs(length)
    f_times, f_failed = time_rotating(fwd, args, FLAGS.repeats)
    b_times, b_failed = (time_rotating({n: bwd[n] for n in f_times}, args, FLAGS.repeats)
                         if FLAGS.backward else ({}, {}))
    flops = _flops(length, causal)
    for name in f_times:
      gflops = flops / f_times[name].median / 1e9
      row = {"length": length, "kernel": name, "fwd_ms": f_times[name].median * 1e3,
             "fwd_gflops": gflops, "fwd_of_peak": gflops / peak}
      line = (f"| {length} | {name} | {f_times[name].ms()} | {gflops:.1f} | "
              f"{gflops / peak:.2f} | {_vs_torch(f_times, name)} |")
      if FLAGS.backward and name in b_times:
        gflops = 3 * flops / b_times[name].median / 1e9
        row.update(bwd_ms=b_times[name].median * 1e3, bwd_gflops=gflops,
                   bwd_of_peak=gflops / peak)
        line += (f" {b_times[name].ms()} | {gflops:.1f} | {gflops / peak:.2f} | "
                 f"{_vs_torch(b_times, name)} |")
      elif FLAGS.backward:
        line += f" failed: {b_failed.get(name, '?')} | | | |"
      print(line, flush=True)
      rows.append(row)
    for name, error in f_failed.items():
      print(f"| {length} | {name} | failed: {error} |", flush=True)
    if too_big:
      print(f"(length {length}: {', '.join(too_big)} not run: 3 score matrices of "
            f"{dense_gib:.1f} GiB exceed --max_dense_gib={FLAGS.max_dense_gib:g})", flush=True)
  return rows


def compiled_memory(name: str, length: int):
  """XLA's memory analysis of causal forward+backward at ``length``: compiled
  from abstract shapes, never run. Returns the stats (None if XLA gives none)."""
  import jax
  import jax.numpy as jnp
  spec = jax.ShapeDtypeStruct(_shape(length), jnp.dtype(FLAGS.dtype))
  grad = jax.jit(jax.grad(_jax_loss(name, True), argnums=(0, 1, 2)))
  return grad.lower(spec, spec, spec).compile().memory_analysis()


def memory_table(names: List[str]) -> None:
  lengths = [int(x) for x in FLAGS.memory_lengths if x]
  if not lengths:
    return
  print(f"\nkernel memory: XLA's compiled memory analysis of causal forward+backward, batch "
        f"{FLAGS.batch}, heads {FLAGS.heads}, head_dim {FLAGS.head_dim}, {FLAGS.dtype}; "
        "temp = the compiled function's working memory (compiled only, nothing allocated)")
  print("| length | kernel | temp GiB | arguments + outputs GiB | compile s |")
  print("|---|---|---|---|---|", flush=True)
  for length in lengths:
    for name in names:
      start = time.perf_counter()
      try:
        stats = compiled_memory(name, length)
      except Exception as e:  # noqa: BLE001 - listed in the table, not fatal
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        print(f"| {length} | {name} | failed: {first} | | |", flush=True)
        continue
      took = time.perf_counter() - start
      if stats is None:
        print(f"| {length} | {name} | (no analysis from XLA) | | {took:.1f} |", flush=True)
        continue
      io = stats.argument_size_in_bytes + stats.output_size_in_bytes
      print(f"| {length} | {name} | {stats.temp_size_in_bytes / 2**30:.3f} | "
            f"{io / 2**30:.3f} | {took:.1f} |", flush=True)


def _memory_child(spec):
  """Runs one causal forward+backward and prints peak RSS in bytes (JSON)."""
  name, length = spec.split(":")
  length = int(length)
  if name == "torch":
    _, bwd = _torch_fns(True)
    bwd(_torch_inputs(length))
  else:
    _, bwd = _jax_fns(name, True)
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


def process_memory_table(names: List[str], torch) -> None:
  """Whole-process peaks (runtime included): comparable with torch, but not
  kernel memory; each (kernel, length) in a fresh process."""
  lengths = [int(x) for x in FLAGS.process_memory_lengths if x]
  if not lengths:
    return
  names = [n for n in names if n not in MATERIALISING] + (["torch"] if torch is not None else [])
  print(f"\nwhole-process peak resident memory (VmHWM, includes the Python/JAX/torch runtime: "
        f"not kernel memory), causal forward+backward, batch {FLAGS.batch}, heads "
        f"{FLAGS.heads}, head_dim {FLAGS.head_dim}, {FLAGS.dtype}, a fresh process each")
  print("| length | kernel | process peak GiB | seconds |")
  print("|---|---|---|---|", flush=True)
  for length in lengths:
    for name in names:
      start = time.perf_counter()
      proc = subprocess.run(
          [sys.executable, os.path.abspath(__file__), f"--_memory_child={name}:{length}",
           f"--batch={FLAGS.batch}", f"--heads={FLAGS.heads}", f"--head_dim={FLAGS.head_dim}",
           f"--dtype={FLAGS.dtype}"],
          capture_output=True, text=True)
      took = time.perf_counter() - start
      if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
        print(f"| {length} | {name} | failed ({last}) | {took:.0f} |", flush=True)
        continue
      peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
      print(f"| {length} | {name} | {peak / 2**30:.2f} | {took:.0f} |", flush=True)


def apply_quick() -> None:
  """``--quick``: tiny sizes and rounds, except for flags given explicitly."""
  timing.apply_quick(FLAGS, QUICK)


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.WARNING)   # the tables, not JAX's backend probing
  if FLAGS.quick:
    apply_quick()
  threads, cpus = pin_threads(FLAGS.threads)   # before JAX and torch start their pools
  import jax
  backend = jax.default_backend()
  torch, no_torch = import_torch(threads, backend)
  if FLAGS._memory_child:
    _memory_child(FLAGS._memory_child)
    return
  print_machine(threads, cpus, torch, no_torch)
  if FLAGS.quick:
    print("(--quick: tiny sizes and rounds; these numbers only show that the script runs)")
  names, skipped = choose_candidates(backend)
  print(f"kernels timed: {', '.join(names)}" + (", torch" if torch is not None else ""))
  print(f"skipped: {'; '.join(skipped) if skipped else 'none'}")

  peak_size, rounds = FLAGS.peak_size, max(FLAGS.repeats, 3)
  before = matmul_peak(peak_size, rounds)
  peak = peak_gflops(before, peak_size)
  print(f"XLA {FLAGS.dtype} matmul peak: {peak_size}x{peak_size}, median of {rounds} rounds: "
        f"{peak:.1f} GFLOP/s (ms {before.ms()})", flush=True)
  speed_table(names, torch, peak)
  if FLAGS.lengths:
    after = matmul_peak(peak_size, rounds)
    drift = "within noise" if after.overlaps(before) else "OUTSIDE the first spread: load changed"
    print(f"XLA {FLAGS.dtype} matmul peak after the speed table: "
          f"{peak_gflops(after, peak_size):.1f} GFLOP/s (ms {after.ms()}; {drift})")
  memory_table(names)
  process_memory_table(names, torch)


if __name__ == "__main__":
  app.run(main)
