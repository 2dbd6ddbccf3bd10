"""Timing shared by the benchmarks: the machine, pinned threads, rotated rounds.

Flag-free, so every benchmark script imports it. Machines are noisy, so
candidates are timed side by side in one process, the order rotated each
round, and each reported as the median with its spread.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable, Dict, List, Tuple


@dataclasses.dataclass(frozen=True)
class Spread:
  """Seconds of the timed rounds of one candidate."""
  times: Tuple[float, ...]

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  def overlaps(self, other: "Spread") -> bool:
    return min(self.times) <= max(other.times) and min(other.times) <= max(self.times)

  def ms(self) -> str:
    return (f"{self.median * 1e3:.1f} ({min(self.times) * 1e3:.1f}-"
            f"{max(self.times) * 1e3:.1f})")


def pin_threads(requested: int) -> Tuple[int, List[int]]:
  """Pins this process to ``requested`` CPUs (0: all it may use) before JAX or
  torch start, so both libraries size their pools from the same CPUs.

  XLA's CPU client sizes its intra-op pool from the CPUs the process may run
  on (the affinity mask), and has no thread-count flag of its own;
  ``--xla_cpu_multi_thread_eigen=false`` makes its Eigen work single-threaded
  when one thread is asked for. torch's OpenMP workers wait passively unless
  ``OMP_WAIT_POLICY`` is set. Returns ``(threads, cpus)``.
  """
  cpus = sorted(os.sched_getaffinity(0))
  threads = len(cpus) if requested <= 0 else min(requested, len(cpus))
  if requested > len(cpus):
    print(f"(--threads={requested}, but this process may use only {len(cpus)} CPUs)")
  if threads < len(cpus):
    cpus = cpus[:threads]
    os.sched_setaffinity(0, cpus)
  if threads == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
  # torch's OpenMP workers otherwise spin after each call, on the same CPUs the
  # XLA candidate timed next needs; on a busy machine spinning also stalls torch
  # itself (measured on the shared 2-core machine: a 256-token SDPA took 10-16
  # ms with the default policy, 0.24 ms passive). Set it in the environment to
  # measure another policy; the threads line prints it.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  return threads, cpus


def cpu_description() -> str:
  """Model name and matmul-relevant flags (first CPU of /proc/cpuinfo)."""
  from attention_lab.kernels import tuning     # imports jax: only after pin_threads
  model, shown = tuning.cpu_flags()
  if not shown:
    return f"cpu {model} (flags unknown: no /proc/cpuinfo flags)"
  flags_text = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in shown.items())
  return f"cpu {model} ({flags_text})"


def tuning_line() -> str:
  """Which CPU kernel settings this process runs with: tuned ones from the
  cache (``benchmarks/tune.py``) or the built-in defaults."""
  from attention_lab.kernels import tuning
  path = tuning.cache_path()
  entry = tuning.read_cache(path).get(tuning.machine_key(), {})
  if not entry:
    return (f"tuning: none for this machine in {path}: blockwise's default blocks"
            if path else f"tuning: off ({tuning.ENV}=off): blockwise's default blocks")
  return (f"tuning: {len(entry.get('blocks', {}))} tuned block classes, cut-over "
          f"{entry.get('blockwise_min_kv_length', 'default')} keys, from {path}")


def time_rotating(candidates: Dict[str, Callable[[], object]],
                  repeats: int) -> Tuple[Dict[str, Spread], Dict[str, str]]:
  """One warm-up (compile) call each, then ``repeats`` rounds that time every
  candidate once, the order rotated by one per round.

  Returns ``({name: Spread}, {name: error line})`` for those that raised in
  the warm-up (a kernel that cannot run a shape is listed, not fatal).
  """
  failed = {}
  for name, fn in candidates.items():
    try:
      fn()
    except Exception as e:  # noqa: BLE001: any failure is reported by name
      failed[name] = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
  order = [n for n in candidates if n not in failed]
  times: Dict[str, List[float]] = {name: [] for name in order}
  for round_ in range(repeats):
    shift = round_ % max(len(order), 1)
    for name in order[shift:] + order[:shift]:
      start = time.perf_counter()
      candidates[name]()
      times[name].append(time.perf_counter() - start)
  return {name: Spread(tuple(t)) for name, t in times.items()}, failed


def matmul_peak(size: int, repeats: int, dtype: str = "float32") -> Spread:
  """Seconds of one ``size x size`` matmul under XLA, per round: the roofline
  the kernels and training steps are measured against."""
  import jax
  import jax.numpy as jnp
  a, b = (jax.random.normal(k, (size, size), jnp.dtype(dtype))
          for k in jax.random.split(jax.random.key(1), 2))
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  times = []
  for _ in range(max(repeats, 3)):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - start)
  return Spread(tuple(times))


def peak_gflops(spread: Spread, size: int) -> float:
  return 2 * size ** 3 / spread.median / 1e9


def apply_quick(flag_values, quick: Dict[str, object]) -> None:
  """``--quick``: sets each flag in ``quick`` to its tiny value, except the
  flags given explicitly on the command line."""
  for name, value in quick.items():
    if not flag_values[name].present:
      flag_values[name].value = value
