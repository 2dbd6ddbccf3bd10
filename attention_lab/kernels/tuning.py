"""Settings of the CPU kernels tuned on this machine: ``blockwise``'s block
sizes per shape class, and the key length from which dispatch prefers
``blockwise`` to the materialised ``jax_nn``.

The best blocks depend on the CPU (cache sizes, vector width, core count):
256 x 1024 blocks measured fastest on one CPU and 512 x 512 on another at the
same shape. ``benchmarks/tune.py`` times the candidates on the current CPU
and writes them to a per-user cache (JSON), keyed by the CPU model and flags,
the CPUs the process may use and the jax version, so a cache from another
machine, another thread count or another jax is never read. Without an entry
for a shape class the built-in defaults apply.

The cache is ``$ATTENTION_LAB_TUNING`` when set (a path, or ``off`` to ignore
every cache, as the tests do), else ``$XDG_CACHE_HOME/attention_lab/cpu_tuning.json``
(``~/.cache/...``). It is read once per process; ``reload()`` rereads it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Dict, Optional, Tuple

import jax

ENV = "ATTENTION_LAB_TUNING"
# Length and head-dim classes: a call is tuned as the smallest class at least
# its size (lengths above the largest class use the largest).
LENGTH_CLASSES = (512, 1024, 2048, 4096, 8192)
HEAD_DIM_CLASSES = (32, 64, 128, 256)


def cpu_flags() -> Tuple[str, Dict[str, bool]]:
  """``(model name, {flag: present})`` of the first CPU in ``/proc/cpuinfo``
  for the flags that decide matmul speed (``('unknown', {})`` without it)."""
  model, found = None, None
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
          model = value.strip()
        elif key.strip() == "flags" and found is None:
          found = set(value.split())
  except OSError:
    pass
  if found is None:
    return model or "unknown", {}
  return model or "unknown", {
      "avx512f": "avx512f" in found, "avx512_bf16": "avx512_bf16" in found,
      "amx": any(f.startswith("amx") for f in found)}


def machine_key() -> str:
  """What a tuned setting is only valid for: CPU, its flags, the CPUs this
  process may use (XLA sizes its thread pool from them) and the jax version."""
  model, flags = cpu_flags()
  on = ",".join(k for k, v in flags.items() if v) or "-"
  return f"{model} [{on}] x{len(os.sched_getaffinity(0))} jax {jax.__version__}"


def cache_path() -> Optional[str]:
  """The cache file, or None when ``$ATTENTION_LAB_TUNING=off``."""
  env = os.environ.get(ENV, "")
  if env.lower() == "off":
    return None
  if env:
    return env
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "attention_lab", "cpu_tuning.json")


def shape_class(banded: bool, kv_length: int, head_dim: int) -> str:
  """``'full|banded / keys class / head-dim class'``, e.g. ``'banded/kv2048/d64'``."""
  kv = next((c for c in LENGTH_CLASSES if kv_length <= c), LENGTH_CLASSES[-1])
  d = next((c for c in HEAD_DIM_CLASSES if head_dim <= c), HEAD_DIM_CLASSES[-1])
  return f"{'banded' if banded else 'full'}/kv{kv}/d{d}"


def read_cache(path: Optional[str]) -> dict:
  """The whole cache file (``{machine key: entry}``); ``{}`` when absent.

  A file that is not a tuning cache raises one line naming it."""
  if path is None or not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"tuning cache {path}: not readable JSON ({e}); delete it or "
                     f"set {ENV}=off") from None
  if not isinstance(data, dict):
    raise ValueError(f"tuning cache {path}: expected a JSON object of machines; delete it "
                     f"or set {ENV}=off")
  return data


@functools.cache
def _entry() -> dict:
  return read_cache(cache_path()).get(machine_key(), {})


def reload() -> None:
  """Forget what was read, so the next lookup rereads the cache."""
  _entry.cache_clear()


def blocks(banded: bool, kv_length: int, head_dim: int) -> Optional[Tuple[int, int]]:
  """Tuned ``(block_q, block_k)`` of ``blockwise`` for this shape class on
  this machine, or None (use the defaults)."""
  found = _entry().get("blocks", {}).get(shape_class(banded, kv_length, head_dim))
  return None if found is None else (int(found[0]), int(found[1]))


def blockwise_min_kv_length(default: int) -> int:
  """The key length from which dispatch picks ``blockwise`` on CPU."""
  return int(_entry().get("blockwise_min_kv_length", default))


def store(path: str, key: str, block_table: Dict[str, Tuple[int, int]],
          min_kv_length: Optional[int]) -> None:
  """Merges one machine's tuned settings into the cache at ``path`` (other
  machines' entries and this machine's other classes are kept)."""
  data = read_cache(path)
  entry = data.setdefault(key, {})
  entry.setdefault("blocks", {}).update({k: list(v) for k, v in block_table.items()})
  if min_kv_length is not None:
    entry["blockwise_min_kv_length"] = int(min_kv_length)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)     # readers never see half a file
  reload()
