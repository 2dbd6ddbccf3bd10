"""Data and sequence parallelism with ``jax.sharding``: one mesh, one jitted step.

The mesh has two axes: ``data`` (the batch is split over it) and ``sequence``
(the ``ring`` kernel splits the sequence over it; 1 unless a config asks).
Parameters and optimiser state are replicated, or split along ``data`` with
``config.mesh.shard_params`` (each leaf along its largest axis that divides).
XLA inserts the collectives: the same jitted train step runs on 1 CPU, 8 TPU
cores or many hosts.

Multi-host: every process runs the same program; each feeds only its own rows
of the global batch (``process_slice``), and ``jax.make_array_from_process_local_data``
assembles the global array.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attention_lab.kernels.ring import DATA_AXIS
from attention_lab.kernels.ring import SEQUENCE_AXIS


def mesh_misfit(data: int, sequence: int, devices: int):
  """Which mesh axis does not fit ``devices``: ``"sequence"`` (it does not
  divide them), ``"data"`` (times the sequence axis it is not all of them;
  -1 always fits), or None."""
  if sequence < 1 or devices % sequence:
    return "sequence"
  if data != -1 and data * sequence != devices:
    return "data"
  return None


def make_mesh(mesh_config) -> jax.sharding.Mesh:
  """A ``(data, sequence)`` mesh over all devices of all processes.

  ``mesh_config.data = -1`` takes every device the sequence axis leaves.

  Raises:
    ValueError: when the axis sizes do not multiply to the device count.
  """
  devices = jax.device_count()
  sequence = mesh_config.sequence
  misfit = mesh_misfit(mesh_config.data, sequence, devices)
  if misfit == "sequence":
    raise ValueError(f"config.mesh.sequence={sequence} does not divide the {devices} devices")
  if misfit == "data":
    raise ValueError(
        f"config.mesh.data={mesh_config.data} x config.mesh.sequence={sequence} must equal "
        f"the device count {devices}")
  data = devices // sequence if mesh_config.data == -1 else mesh_config.data
  auto = (jax.sharding.AxisType.Auto,) * 2   # XLA places what the code does not say
  return jax.make_mesh((data, sequence), (DATA_AXIS, SEQUENCE_AXIS), axis_types=auto)


def check_batch_size(batch_size: int, mesh) -> None:
  data = mesh.shape[DATA_AXIS]
  if batch_size % data:
    raise ValueError(
        f"batch_size {batch_size} does not divide by the {data} devices of the data axis "
        f"(set --config.batch_size to a multiple of {data})")


def round_up_to_devices(batch_size: int, mesh) -> int:
  """Evaluation pads its last batch anyway: round its size up to fit the mesh."""
  data = mesh.shape[DATA_AXIS]
  return -(-batch_size // data) * data


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_sharding(tree, mesh, shard: bool):
  """Shardings for a pytree of arrays: replicated, or each leaf split along
  ``data`` on its largest axis that divides by the axis size."""
  data = mesh.shape[DATA_AXIS]

  def one(leaf):
    shape = np.shape(leaf)
    if not shard or data == 1:
      return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % data == 0:
        spec = [None] * len(shape)
        spec[axis] = DATA_AXIS
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)
  return jax.tree_util.tree_map(one, tree)


def process_slice(batch_size: int) -> slice:
  """This process's rows of a global batch of ``batch_size``."""
  per_process = batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def put_batch(batch, mesh) -> Any:
  """Global numpy batch -> arrays split along ``data`` (this process's rows only)."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))

  def one(x):
    x = np.asarray(x)
    rows = process_slice(len(x))
    return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)
  return jax.tree_util.tree_map(one, batch)


def is_writer() -> bool:
  """Only the first process writes logs, metrics and pictures."""
  return jax.process_index() == 0


__all__ = ["check_batch_size", "mesh_misfit", "is_writer", "make_mesh", "param_sharding", "process_slice",
           "put_batch", "replicated", "round_up_to_devices"]
