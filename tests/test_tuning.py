"""Per-CPU tuned kernel settings (``kernels.tuning``): the cache's keys and
classes, ``blockwise`` and dispatch reading it, and ``benchmarks/tune.py``
writing it."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab.kernels import blockwise
from attention_lab.kernels import checks
from attention_lab.kernels import tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """A cache file this test owns, read afresh before and after."""
  path = tmp_path / "tuning.json"
  monkeypatch.setenv(tuning.ENV, str(path))
  tuning.reload()
  yield path
  tuning.reload()


def test_shape_classes_round_up_to_the_next_class():
  assert tuning.shape_class(False, 1, 8) == "full/kv512/d32"
  assert tuning.shape_class(False, 512, 32) == "full/kv512/d32"
  assert tuning.shape_class(True, 513, 33) == "banded/kv1024/d64"
  assert tuning.shape_class(False, 4097, 64) == "full/kv8192/d64"
  assert tuning.shape_class(True, 100_000, 512) == "banded/kv8192/d256"   # beyond: the largest


def test_no_cache_means_defaults(cache):
  assert not cache.exists()
  assert tuning.blocks(False, 1024, 64) is None
  assert tuning.blockwise_min_kv_length(1024) == 1024


def test_store_merges_and_only_this_machine_is_read(cache):
  cache.write_text(json.dumps({"another CPU x2 jax 0.1": {"blocks": {"full/kv1024/d64": [8, 8]},
                                                          "blockwise_min_kv_length": 16}}))
  tuning.reload()
  assert tuning.blocks(False, 1024, 64) is None          # another machine's entry is ignored
  key = tuning.machine_key()
  tuning.store(str(cache), key, {"full/kv1024/d64": (128, 512)}, 512)
  tuning.store(str(cache), key, {"banded/kv2048/d32": (64, 256)}, None)
  assert tuning.blocks(False, 1000, 64) == (128, 512)
  assert tuning.blocks(True, 2048, 32) == (64, 256)
  assert tuning.blocks(True, 1000, 64) is None
  assert tuning.blockwise_min_kv_length(1024) == 512     # kept by the second store
  data = json.loads(cache.read_text())
  assert data["another CPU x2 jax 0.1"]["blockwise_min_kv_length"] == 16


def test_machine_key_names_the_cpu_count_and_jax():
  key = tuning.machine_key()
  assert f"x{len(os.sched_getaffinity(0))} " in key and key.endswith(f"jax {jax.__version__}")


def test_off_reads_nothing(monkeypatch, tmp_path):
  monkeypatch.setenv(tuning.ENV, "off")
  assert tuning.cache_path() is None
  monkeypatch.setenv(tuning.ENV, "")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert tuning.cache_path() == str(tmp_path / "attention_lab" / "cpu_tuning.json")


def test_a_broken_cache_is_one_line_naming_the_file(cache):
  cache.write_text("{not json")
  tuning.reload()
  with pytest.raises(ValueError, match=rf"tuning cache {cache}: not readable JSON.*"
                                       rf"{tuning.ENV}=off"):
    tuning.blocks(False, 1024, 64)


def _operand_shapes(q, k, v, **kw):
  """Every ``[1, 2, T, 16]`` shape in blockwise's jaxpr (a fresh function each
  call: JAX reuses a traced jaxpr for the same function and shapes)."""
  text = str(jax.make_jaxpr(lambda *a: blockwise.blockwise_attention(*a, **kw))(q, k, v))
  return set(re.findall(r"\[1,2,(\d+),16\]", text.replace(" ", "")))


def test_blockwise_uses_the_tuned_blocks_for_its_class(cache):
  length, d = 130, 16
  q, k, v = (jax.random.normal(key, (1, length, 2, d))
             for key in jax.random.split(jax.random.key(0), 3))
  # Without a cache, the default 128 x 1024: queries in 2 blocks of 128 (256
  # padded), keys in one block of round_up(130, 8) = 136.
  assert _operand_shapes(q, k, v) == {"130", "128", "256", "136"}
  tuning.store(str(cache), tuning.machine_key(), {"full/kv512/d32": (48, 80)}, None)
  # Queries padded to 3 blocks of 48, keys to 2 blocks of 80.
  assert {"144", "48", "160", "80"} <= _operand_shapes(q, k, v)
  # Explicit blocks win over the cache; causal is another class (none tuned).
  assert _operand_shapes(q, k, v, block_q=64, block_k=64) == {"130", "192", "64"}
  assert _operand_shapes(q, k, v, is_causal=True) == {"130", "136"}
  # The tuned blocks compute the same attention as a float64 softmax.
  got = blockwise.blockwise_attention(q, k, v)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(d)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, np.einsum("bhqk,bkhd->bqhd", w, v64), atol=2e-5)


def test_dispatch_cut_over_comes_from_the_cache(cache):
  shape = checks.AttentionShape(batch=(1,), q_length=256, kv_length=256, heads=2, kv_heads=2,
                                head_dim=16, value_dim=16)
  assert kernels.select(frozenset(), "cpu", "float32", shape).name == "jax_nn"
  tuning.store(str(cache), tuning.machine_key(), {}, 256)
  assert kernels.select(frozenset(), "cpu", "float32", shape).name == "blockwise"


def test_tune_script_quick_mode_writes_this_machines_cache(tmp_path):
  path = tmp_path / "cache.json"
  proc = subprocess.run([sys.executable, os.path.join("benchmarks", "tune.py"), "--quick",
                         f"--cache={path}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert any(line.startswith("| full/kv512/d32 | 128 | ") for line in lines)
  assert any(line.startswith("| banded/kv512/d32 | 128 | ") for line in lines)
  assert any(line.startswith("dispatch cut-over: blockwise from ") for line in lines)
  entry = json.loads(path.read_text())[tuning.machine_key()]
  assert set(entry["blocks"]) == {"full/kv512/d32", "banded/kv512/d32"}
  # One of the --quick candidates, or the default (128 x 1024 or 256 x 512,
  # clipped to the 128 keys).
  timed = {(bq, bk) for bq in (32, 64) for bk in (64, 128)} | {(128, 128)}
  assert {tuple(pair) for pair in entry["blocks"].values()} <= timed
  assert entry["blockwise_min_kv_length"] in (64, 128, 256)
