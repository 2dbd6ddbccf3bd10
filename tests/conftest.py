"""Shared fixtures: a prepared offline TFDS directory and a tiny config."""

import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests run on CPU
# Block sizes and the dispatch cut-over that benchmarks/tune.py cached for this
# CPU would change what the kernel tests exercise: the tests use the defaults.
os.environ["ATTENTION_LAB_TUNING"] = "off"

# One compilation cache for the session, this process and the runs it starts:
# many tests compile the same tiny steps (an uninterrupted run and a resumed
# one of the same config), and XLA's CPU compiles are most of the suite's time.
# A fresh directory per session, so nothing is reused from an older checkout.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="attention_lab_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# pytest-xdist workers inherit the directory: each takes its own part of it.
# JAX writes a cache entry in place, so a worker reading the entry another is
# writing found it truncated ("Error reading persistent compilation cache
# entry ... incomplete or truncated stream", a warning, then a recompile).
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("ATTENTION_LAB_CACHE_SPLIT"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])
  os.environ["ATTENTION_LAB_CACHE_SPLIT"] = "1"
  os.makedirs(os.environ["JAX_COMPILATION_CACHE_DIR"], exist_ok=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data directory with mnist_offline prepared once per session."""
  from attention_lab.data import sources
  path = str(tmp_path_factory.mktemp("tfds"))
  sources.load_split("mnist_offline", "test[:1]", path)
  return path


def tiny_vit_config(data_dir, **overrides):
  """mnist_vit shrunk to seconds: 1 layer, width 16, 50 eval digits."""
  import experiments
  config = experiments.get_config("mnist_vit")
  config.data.data_dir = data_dir
  config.data.eval_split = "test[:50]"
  config.total_steps = 6
  config.batch_size = 16
  config.eval_batch_size = 32
  config.log_every = 2
  config.eval_every = 3
  config.checkpoint_every = 2
  config.optimizer.warmup_steps = 2
  config.model.patch_size = 7
  config.model.stem = "patch"
  config.model.hidden_dim = 16
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.mlp_dim = 32
  config.viz.num_examples = 2
  return override(config, **overrides)


def prepare_stand_in(name, path, split_generators):
  """Prepares TFDS's real builder ``name`` in ``path`` from local examples.

  Only the download step is replaced (``split_generators(self, dl_manager)``
  returns ``{split: examples}``): files, metadata and reading are TFDS's own,
  so ``tfds.load(name)`` then runs as it does for a user with internet.
  """
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=path)
  original = type(builder)._split_generators
  type(builder)._split_generators = split_generators
  try:
    builder.download_and_prepare()
  finally:
    type(builder)._split_generators = original
  return path


def _files_under(folder):
  """``{relative path: (inode, mtime_ns, size)}`` of every file under ``folder``."""
  found = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      info = os.stat(path)
      found[os.path.relpath(path, folder)] = (info.st_ino, info.st_mtime_ns, info.st_size)
  return found


def _saved_state(workdir, step):
  """The train state saved at ``step`` (parameters, optimiser state, model
  state such as BatchNorm statistics, step) as numpy arrays, read with orbax
  directly rather than through the training code."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree_util.tree_map(np.asarray, tree)


def _read_json(workdir, name):
  import json
  with open(os.path.join(workdir, name)) as f:
    return ([json.loads(line) for line in f if line.strip()] if name.endswith(".jsonl")
            else json.load(f))


def train_stop_and_resume(config, workdir):
  """Trains ``config`` in ``workdir`` to step 2, stops, reruns to the end
  (resuming), and checks the result against an uninterrupted run of the same
  config in another directory: the final train state bit for bit (measured
  bit-identical on CPU for ListOps, the BiGRU pooling model, KWT and the
  Conformer with its BatchNorm statistics), ``results.json`` (all but the wall
  time) and every row of ``metrics.jsonl``. Returns the resumed run's results.
  """
  import tempfile
  import jax
  import numpy as np
  from attention_lab import train
  stopped = train.train_and_evaluate(config, workdir, stop_after=2)
  assert stopped["stopped_at_step"] == 2, stopped
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  checkpoint_2 = os.path.join(workdir, "checkpoints", "2")
  written_at_stop = _files_under(checkpoint_2)
  assert written_at_stop
  results = train.train_and_evaluate(config, workdir)           # resumes at step 2
  assert results["step"] == config.total_steps
  # It started from that checkpoint, not from scratch: steps 1-2 were not
  # trained (nor step 2 saved) again.
  assert _files_under(checkpoint_2) == written_at_stop
  with tempfile.TemporaryDirectory() as straight:
    straight_results = train.train_and_evaluate(config, straight)
    want = _saved_state(straight, config.total_steps)
    want_files = _read_json(straight, "results.json"), _read_json(straight, "metrics.jsonl")
  got = _saved_state(workdir, config.total_steps)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  got_files = _read_json(workdir, "results.json"), _read_json(workdir, "metrics.jsonl")
  untimed = []
  for saved in (got_files[0], want_files[0], results, straight_results):
    assert saved["wall_time_s"] > 0
    untimed.append({k: v for k, v in saved.items() if k != "wall_time_s"})
  assert got_files[0]["experiment"] == config.experiment
  assert untimed[0] == untimed[1] == untimed[2] == untimed[3]
  assert got_files[1] == want_files[1]                       # metrics.jsonl, row for row
  return results


def assert_matches_float64(f, dense, q, k, v, cot, *, atol, grad_atol):
  """``f(q, k, v)`` and its gradients wrt q, k, v (of ``sum(out * cot)``)
  against ``dense`` run in float64 on the same inputs. Returns ``f``'s output."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  got = f(q, k, v)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2))(q, k, v)
  with jax.enable_x64(True):
    as64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    want = dense(as64(q), as64(k), as64(v))
    want_grads = jax.grad(lambda *a: jnp.sum(dense(*a) * cot), (0, 1, 2))(
        as64(q), as64(k), as64(v))
  np.testing.assert_allclose(got, want, atol=atol)
  for which, g, w in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(g, w, atol=grad_atol, err_msg=which)
  return got


def numpy_self_attention(params, x, *, mask=None, bias=None, is_causal=False):
  """A ``MultiHeadAttention`` layer in float64 numpy from its parameters
  (``{"query", "key", "value", "out"}``, Flax's layout), written out:
  ``softmax(q k^T / sqrt(head_dim) + bias)`` over the allowed keys (a row with
  none is all zeros), then ``weights @ v`` and the output projection.

  Args:
    x: ``[batch, length, features]``; mask bool and bias float, broadcastable
      to ``[batch, heads, length, length]``.

  Returns:
    ``(out [batch, length, out_features], weights [batch, heads, length, length])``.
  """
  import jax
  import numpy as np
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  project = lambda name: np.einsum("btf,fnh->btnh", x, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = project("query"), project("key"), project("value")
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  length = x.shape[1]
  allowed = np.ones(logits.shape, bool)
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask, bool), logits.shape)
  if is_causal:
    allowed &= np.tril(np.ones((length, length), bool))
  row_max = np.where(allowed, logits, -np.inf).max(-1, keepdims=True)
  exp = np.where(allowed, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  total = exp.sum(-1, keepdims=True)
  weights = exp / np.where(total > 0, total, 1.0)          # all-masked rows stay 0
  out = np.einsum("bnts,bsnh->btnh", weights, v)
  out = np.einsum("btnh,nhf->btf", out, p["out"]["kernel"]) + p["out"]["bias"]
  return out, weights


def htk_mel_filterbank(num_mels, fft_size, sample_rate, low_hz=20.0, high_hz=None, warp=1.0):
  """Triangular mel filters written out from the HTK formulas, in float64.

  ``mel(f) = 2595 log10(1 + f / 700)``; ``num_mels + 2`` edges equally spaced
  in mel from ``low_hz`` to ``high_hz`` (default Nyquist); filter ``k`` rises
  linearly in Hz from edge ``k`` to 1 at edge ``k + 1`` and falls to 0 at edge
  ``k + 2``. ``warp`` reads every filter at ``f * warp`` (vocal tract length
  perturbation).

  Returns:
    ``[fft_size // 2 + 1, num_mels]``.
  """
  import math
  import numpy as np
  high_hz = sample_rate / 2 if high_hz is None else high_hz
  mel = lambda hz: 2595.0 * math.log10(1.0 + hz / 700.0)
  hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
  step = (mel(high_hz) - mel(low_hz)) / (num_mels + 1)
  edges = [hz(mel(low_hz) + i * step) for i in range(num_mels + 2)]
  filters = np.zeros((fft_size // 2 + 1, num_mels))
  for j in range(fft_size // 2 + 1):
    f = j * sample_rate / fft_size * warp
    for k in range(num_mels):
      left, centre, right = edges[k], edges[k + 1], edges[k + 2]
      if left < f <= centre:
        filters[j, k] = (f - left) / (centre - left)
      elif centre < f < right:
        filters[j, k] = (right - f) / (right - centre)
  return filters


def numpy_log_mel(wave, *, sample_rate=16000, window=400, hop=160, fft_size=512,
                  num_mels=40, floor=1e-6, warp=1.0):
  """Log mel power spectrogram in float64, frame by frame: periodic Hann
  window, numpy's FFT, ``htk_mel_filterbank``, ``log(max(mel, floor))``.

  Args:
    wave: ``[samples]``.

  Returns:
    ``[1 + (samples - window) // hop, num_mels]``.
  """
  import numpy as np
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)
  filters = htk_mel_filterbank(num_mels, fft_size, sample_rate, warp=warp)
  rows = []
  for start in range(0, len(wave) - window + 1, hop):
    power = np.abs(np.fft.rfft(np.asarray(wave[start:start + window], np.float64) * hann,
                               n=fft_size)) ** 2
    rows.append(np.log(np.maximum(power @ filters, floor)))
  return np.stack(rows)


def assert_picture(path):
  """``path`` is a picture of some size with something drawn on it."""
  import numpy as np
  from PIL import Image
  pixels = np.asarray(Image.open(path).convert("L"), np.float32)
  assert min(pixels.shape) >= 100 and pixels.std() > 5, path


def override(config, **overrides):
  """Sets dotted keys (``"model.hidden_dim"``) on ``config``; returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def tiny_config(data_dir):
  return lambda **overrides: tiny_vit_config(data_dir, **overrides)


def run_on_devices(devices: int, code: str, timeout: int = 600) -> str:
  """Runs ``code`` in a fresh Python with ``devices`` simulated CPU devices
  (a process's device count is fixed when JAX starts); returns its stdout."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout
