"""The ``attention-lab`` command of an installed package: ``python run.py``.

``run.py`` stays the one implementation (the package installs it as the
top-level module ``run``); this runs it as ``__main__`` with the command's
arguments, so ``attention-lab --experiment=mnist_vit --workdir=runs/mnist_vit``
and ``python run.py --experiment=mnist_vit --workdir=runs/mnist_vit`` cannot
drift apart.
"""

import runpy


def main():
  # alter_sys: sys.argv[0] becomes run.py's path; the flags stay as given.
  runpy.run_module("run", run_name="__main__", alter_sys=True)
