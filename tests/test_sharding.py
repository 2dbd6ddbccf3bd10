"""Data parallelism on simulated CPU devices: same training on 1 and 4 devices,
checkpoints restored onto other device counts, sharded parameters, the ring
kernel inside a model, and the errors for meshes that do not fit."""

import json
import os

import jax
import numpy as np
import pytest

from attention_lab import train
from attention_lab.train import checkpoint as checkpoint_lib
from attention_lab.train import loop
from conftest import run_on_devices
from conftest import tiny_vit_config

# A child process builds the same tiny config as tiny_vit_config, trains it in
# WORKDIR and saves its final parameters (gathered to the host) as npz.
CHILD = """
import sys, numpy as np, jax
sys.path.insert(0, "tests")
from conftest import tiny_vit_config
from attention_lab import train
from attention_lab.train import loop, checkpoint as checkpoint_lib
config = tiny_vit_config({data_dir!r}, **{overrides!r})
workdir = {workdir!r}
if {train!r}:
  results = train.train_and_evaluate(config, workdir)
  print("eval_loss", results["eval_loss"])
exp = loop.Trainer(config)
state, _ = checkpoint_lib.Checkpoints(workdir + "/checkpoints", 3).restore(exp.initial_state)
leaves = jax.tree_util.tree_leaves(state.params)
specs = {{str(leaf.sharding.spec) for leaf in leaves}}
print("devices", jax.device_count(), "specs", sorted(specs))
np.savez({out!r}, *[np.asarray(jax.device_get(x)) for x in leaves])
"""

OVERRIDES = {"total_steps": 4, "checkpoint_every": 2, "eval_every": 2, "batch_size": 16,
             "model.dropout_rate": 0.1}


def _child(devices, data_dir, workdir, out, train_first=True, **overrides):
  code = CHILD.format(data_dir=data_dir, overrides={**OVERRIDES, **overrides},
                      workdir=str(workdir), train=train_first, out=str(out))
  return run_on_devices(devices, code)


def _params(path):
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files, key=lambda n: int(n.split("_")[1]))]


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, data_dir):
  """The reference: the same tiny run on this process's single device."""
  workdir = str(tmp_path_factory.mktemp("one_device"))
  results = train.train_and_evaluate(tiny_vit_config(data_dir, **OVERRIDES), workdir)
  exp = loop.Trainer(tiny_vit_config(data_dir, **OVERRIDES))
  state, _ = checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"), 3).restore(
      exp.initial_state)
  return results, [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]


def test_four_devices_train_like_one(tmp_path, data_dir, one_device_run):
  results, params = one_device_run
  out = _child(4, data_dir, tmp_path / "run", tmp_path / "p.npz")
  assert "devices 4 specs ['P()']" in out            # replicated
  loss = float(out.split("eval_loss")[1].split()[0])
  assert loss == pytest.approx(results["eval_loss"], rel=1e-4)
  for a, b in zip(params, _params(tmp_path / "p.npz")):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  # Saved on 4 devices, restored onto 1 (here) and onto 2 (a child process).
  exp = loop.Trainer(tiny_vit_config(data_dir, **OVERRIDES))
  state, _ = checkpoint_lib.Checkpoints(str(tmp_path / "run" / "checkpoints"), 3).restore(
      exp.initial_state)
  saved = _params(tmp_path / "p.npz")
  for a, b in zip(jax.tree_util.tree_leaves(state.params), saved):
    np.testing.assert_array_equal(np.asarray(a), b)
  out = _child(2, data_dir, tmp_path / "run", tmp_path / "p2.npz", train_first=False)
  assert "devices 2" in out
  for a, b in zip(_params(tmp_path / "p2.npz"), saved):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow   # data parallelism trains like one device in the default suite
def test_sharded_parameters_train_like_replicated(tmp_path, data_dir, one_device_run):
  _, params = one_device_run
  out = _child(4, data_dir, tmp_path / "run", tmp_path / "p.npz", **{"mesh.shard_params": True})
  assert "P('data'" in out or "P(None, 'data'" in out
  for a, b in zip(params, _params(tmp_path / "p.npz")):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow   # ring attention is checked on simulated devices in test_ring.py
def test_ring_kernel_inside_a_model(tmp_path, data_dir, one_device_run):
  """ViT with the ring kernel on a (data 2, sequence 2) mesh trains like the
  single-device run (17 tokens: not divisible by the ring; padded inside)."""
  _, params = one_device_run
  out = _child(4, data_dir, tmp_path / "run", tmp_path / "p.npz",
               **{"model.attention.kernel": "ring", "mesh.sequence": 2})
  for a, b in zip(params, _params(tmp_path / "p.npz")):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_meshes_that_do_not_fit_are_clear_errors(data_dir):
  out = run_on_devices(4, f"""
    import sys; sys.path.insert(0, "tests")
    from conftest import tiny_vit_config
    from attention_lab.train import loop
    for overrides in ({{"batch_size": 6}}, {{"mesh.sequence": 3}}, {{"mesh.data": 3}}):
      try:
        loop.Trainer(tiny_vit_config({data_dir!r}, **overrides))
      except ValueError as e:
        print("error:", e)
  """)
  assert "batch_size 6 does not divide by the 4 devices of the data axis" in out
  assert "config.mesh.sequence=3 does not divide the 4 devices" in out
  assert "config.mesh.data=3 x config.mesh.sequence=1 must equal the device count 4" in out


MULTI_HOST_CHILD = """
import sys, json, jax
sys.path.insert(0, "tests")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="localhost:{port}", num_processes=2,
                           process_id=int(sys.argv[1]))
from conftest import tiny_vit_config
from attention_lab import train
config = tiny_vit_config({data_dir!r}, **{overrides!r})
results = train.train_and_evaluate(config, {workdir!r})
print("process", jax.process_index(), "of", jax.process_count(), "devices",
      jax.device_count(), "eval_loss", results["eval_loss"])
"""


@pytest.mark.slow   # suite time; four devices train like one in the default suite
def test_two_processes_train_like_one_device(tmp_path, data_dir, one_device_run):
  """Two processes with two CPU devices each (gloo collectives on localhost),
  as two hosts would run: each feeds its own rows, orbax saves from both,
  only the first writes results, metrics and pictures."""
  import socket
  import subprocess
  import sys
  from conftest import ROOT
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "run"
  code = MULTI_HOST_CHILD.format(port=port, data_dir=data_dir, overrides=OVERRIDES,
                                 workdir=str(workdir))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  assert "process 0 of 2 devices 4" in outs[0][0] and "process 1 of 2 devices 4" in outs[1][0]
  results, params = one_device_run
  loss = float(outs[1][0].split("eval_loss")[1])
  assert loss == pytest.approx(results["eval_loss"], rel=1e-4)
  # One set of outputs, from the first process.
  with open(workdir / "metrics.jsonl") as f:
    assert [r["step"] for r in map(json.loads, f) if r["split"] == "train"] == [2, 4]
  assert (workdir / "results.json").exists() and (workdir / "attention" / "index.html").exists()
  # The two-host checkpoint restores onto this single device.
  exp = loop.Trainer(tiny_vit_config(data_dir, **OVERRIDES))
  state, _ = checkpoint_lib.Checkpoints(str(workdir / "checkpoints"), 3).restore(
      exp.initial_state)
  for a, b in zip(params, jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-5)
