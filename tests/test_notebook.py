"""The Colab quick-start notebook runs from top to bottom on a CPU.

nbclient executes it in a local Jupyter kernel (this environment's Python)
with the tiny config (``QUICK``): devices, training, the pictures drawn by
``--mode=visualize`` shown inline, TensorBoard started. Its parameters are
overridden the way papermill does it, by a cell inserted after the one
tagged ``parameters``. The install cell is skipped (``INSTALL = False``):
cloning and ``pip install -e`` would re-point this environment's own
installation at a temporary clone; the package is installed here already
(``make install``), which is what that cell provides on Colab.
"""

import os
import signal
import sys

import nbformat
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_quickstart.ipynb")


def _cell(notebook, tag):
  cells = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"one cell tagged {tag!r} expected"
  return cells[0]


def _stop_tensorboards(logdir):
  """Stops the TensorBoard servers the notebook started for ``logdir`` (the
  magic leaves them running after the kernel exits), by their process ids."""
  from tensorboard import manager
  for info in manager.get_all():
    if logdir in info.logdir:
      try:
        os.kill(info.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass


def test_colab_quickstart_runs_on_cpu_and_shows_pictures(tmp_path, data_dir, monkeypatch):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  workdir = str(tmp_path / "mnist_vit")
  parameters = notebook.cells.index(_cell(notebook, "parameters"))
  notebook.cells.insert(parameters + 1, nbformat.v4.new_code_cell(
      f"REPO_URL = {ROOT!r}\nREPO_DIR = {ROOT!r}\nWORKDIR = {workdir!r}\n"
      "QUICK = True\nINSTALL = False",
      metadata={"tags": ["injected-parameters"]}))
  # The kernel and the runs it starts inherit this environment: the offline
  # MNIST already prepared by the session, CPU only, this environment's
  # TensorBoard (a shell's PATH may not have it).
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TENSORBOARD_BINARY", os.path.join(os.path.dirname(sys.executable),
                                                        "tensorboard"))
  client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  try:
    client.execute()
  finally:
    _stop_tensorboards(workdir)

  assert os.path.isfile(os.path.join(workdir, "results.json"))
  outputs = _cell(notebook, "pictures").outputs
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  # The tiny config draws 2 examples: input, overlay and heads each.
  assert len(images) == 6, [o.get("output_type") for o in outputs]
  tensorboard = _cell(notebook, "tensorboard").outputs
  assert any("tensorboard" in str(o.get("data", {}).get("text/html", "")).lower()
             or "tensorboard" in str(o.get("data", {}).get("application/javascript", "")).lower()
             for o in tensorboard), tensorboard


def test_on_a_tpu_runtime_the_notebook_stops_when_jax_does_not_see_the_tpu(tmp_path,
                                                                         monkeypatch):
  """A TPU runtime (here only its environment variable) whose JAX runs on
  the CPU: the devices cell stops with the fix, before any training."""
  from nbclient.exceptions import CellExecutionError
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  cells = [_cell(notebook, tag) for tag in ("parameters", "install", "devices")]
  cells.insert(1, nbformat.v4.new_code_cell("INSTALL = False"))
  notebook.cells = cells
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  try:
    client.execute()
  except CellExecutionError as e:
    assert "this runtime has a TPU but JAX does not run on it" in str(e), str(e)[-2000:]
  else:
    raise AssertionError("the devices cell let a TPU runtime run on the CPU")
  assert "cpu" in "".join(o.get("text", "") for o in cells[-1].outputs)
