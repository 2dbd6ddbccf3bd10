#!/usr/bin/env bash
# Install check on Python 3.12 with the newest releases the dependency ranges
# admit (no constraints.txt): a fresh venv, `pip install .[cpu,test]`, then,
# from a directory outside the checkout so the installed package is what runs,
# imports, a tiny mnist_vit run through the `attention-lab` command, and the
# kernel tests. Prints the versions it got and the time of each step.
#
#   .ci/py312_smoke.sh            (PYTHON312=/path/to/python3.12 to choose one)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

find_python312() {
  local pyenv_root candidate
  pyenv_root="$(pyenv root 2>/dev/null || true)"
  for candidate in "${PYTHON312:-}" python3.12 "$pyenv_root"/versions/3.12*/bin/python3.12; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: no Python 3.12 found (set PYTHON312)" >&2
  return 1
}

PY312="$(find_python312)"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/attention_lab_py312.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
VENV="$SCRATCH/venv"
export TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES="" JAX_PLATFORMS=cpu
START=$SECONDS
step() { echo "== $1 (at $((SECONDS - START)) s)"; }

step "fresh venv with $("$PY312" -V)"
"$PY312" -m venv "$VENV"
# pip's warnings about find-links folders this machine's pip.conf names but
# lacks are dropped; pip's own exit status still counts (pipefail).
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }
quiet_pip install -q --upgrade pip
step "pip install .[cpu,test] (newest releases, no constraints)"
quiet_pip install -q "$ROOT[cpu,test]"
"$VENV/bin/python" -V
"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -i -E \
  '^(jax|jaxlib|flax|optax|orbax[-_]checkpoint|numpy|tensorflow[-_]cpu|tensorflow|tensorflow[-_]datasets|tensorboard|ml[-_]collections|matplotlib|scipy|pytest|hypothesis|nbclient|ipykernel)=='

cd "$SCRATCH"    # outside the checkout: imports come from the installed package
step "imports from the installed package"
"$VENV/bin/python" - <<'PY'
import os, attention_lab, experiments, run
for module in (attention_lab, experiments, run):
  assert "site-packages" in module.__file__, module.__file__
assert "mnist_vit" in experiments.names()
from attention_lab import kernels, models, train  # noqa: F401
from attention_lab.data import sources
print("imports ok; experiments:", len(experiments.names()), "; kernels:", kernels.names())
PY

step "tiny mnist_vit through the attention-lab command"
"$VENV/bin/attention-lab" --experiment=mnist_vit --workdir="$SCRATCH/run" \
  --config.data.data_dir="$SCRATCH/tfds" '--config.data.eval_split=test[:50]' \
  --config.total_steps=6 --config.batch_size=16 --config.eval_batch_size=32 \
  --config.log_every=2 --config.eval_every=3 --config.checkpoint_every=3 \
  --config.optimizer.warmup_steps=2 --config.model.stem=patch --config.model.patch_size=7 \
  --config.model.hidden_dim=16 --config.model.num_layers=2 --config.model.num_heads=2 \
  --config.model.mlp_dim=32 --config.viz.num_examples=2 2>&1 | tail -n 5
"$VENV/bin/python" -c "import json, sys; r = json.load(open(sys.argv[1])); assert r['step'] == 6, r; print('results.json:', r)" "$SCRATCH/run/results.json"

step "kernel tests on the newest releases"
"$VENV/bin/python" -m pytest -x -q "$ROOT/tests/test_kernels.py"

step "done in $((SECONDS - START)) s"
