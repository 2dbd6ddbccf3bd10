"""Convolutional-attention ablation: mnist_cnn with none / SE / ECA / CBAM.

Trains ``experiments/mnist_cnn.py`` once per setting with the same seed(s),
steps and batch size, each in its own process, then prints a table of test
accuracy, parameters and training speed, and writes it into docs/results.md
between the ``conv-attention-ablation`` markers.

  python benchmarks/conv_attention.py                  # seed 0, default budget
  python benchmarks/conv_attention.py --seeds=0,1,2    # mean and spread over seeds

Runs go to ``--workdir_root/KIND_seedS``; a finished run is read back, not
retrained (delete its folder to train it again).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("none", "se", "eca", "cbam")
START = "<!-- conv-attention-ablation:start -->"
END = "<!-- conv-attention-ablation:end -->"

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir_root", os.path.join(ROOT, "runs", "conv_attention_ablation"),
                    "where the runs go")
flags.DEFINE_string("seeds", "0", "comma-separated seeds; every setting runs each")
flags.DEFINE_string("readme", os.path.join(ROOT, "docs", "results.md"),
                    "file whose marked table is replaced ('' to only print)")
flags.DEFINE_list("overrides", [], "extra --config.* overrides for every run, e.g. "
                  "total_steps=300 (for a quick look; the published table uses the defaults)")


def _train(kind: str, seed: int) -> dict:
  workdir = os.path.join(FLAGS.workdir_root, f"{kind}_seed{seed}")
  results_path = os.path.join(workdir, "results.json")
  if not os.path.exists(results_path):
    command = [sys.executable, os.path.join(ROOT, "run.py"), "--experiment=mnist_cnn",
               f"--workdir={workdir}", f"--config.model.conv_attention={kind}",
               f"--config.seed={seed}"] + [f"--config.{o}" for o in FLAGS.overrides]
    log_path = workdir + ".log"
    print(f"training {kind} (seed {seed}) in {workdir}; log in {log_path}", flush=True)
    start = time.time()
    os.makedirs(FLAGS.workdir_root, exist_ok=True)
    with open(log_path, "w") as log:
      subprocess.run(command, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    print(f"  done in {time.time() - start:.0f} s", flush=True)
  with open(results_path) as f:
    return json.load(f)


def _table(results) -> str:
  """Markdown table, one row per setting; accuracy as mean (min-max) over seeds."""
  lines = ["| conv attention | test accuracy | parameters | steps/s | training time |",
           "|---|---|---|---|---|"]
  for kind in KINDS:
    runs = results[kind]
    accs = [100 * r["eval_accuracy"] for r in runs]
    acc = f"{statistics.mean(accs):.2f}%"
    if len(accs) > 1:
      acc += f" ({min(accs):.1f}-{max(accs):.1f}, {len(accs)} seeds)"
    speed = statistics.median(r["step"] / r["wall_time_s"] for r in runs)
    wall = statistics.median(r["wall_time_s"] for r in runs)
    lines.append(f"| {kind} | {acc} | {runs[0]['num_params']:,} | {speed:.1f} | "
                 f"{wall / 60:.1f} min |")
  return "\n".join(lines)


def _write_readme(path: str, table: str, note: str) -> None:
  with open(path) as f:
    text = f.read()
  if START not in text or END not in text:
    raise SystemExit(f"{path} has no {START} ... {END} markers to replace")
  block = f"{START}\n{note}\n\n{table}\n{END}"
  text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text,
                flags=re.S)
  with open(path, "w") as f:
    f.write(text)


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds.split(",")]
  results = {kind: [_train(kind, seed) for seed in seeds] for kind in KINDS}
  table = _table(results)
  print(table)
  steps = results["cbam"][0]["step"]
  note = (f"`python benchmarks/conv_attention.py --seeds={FLAGS.seeds}`: mnist_cnn, "
          f"{steps} steps, seed(s) {FLAGS.seeds}, 1,000 held-out digits, this 2-core CPU; "
          "steps/s and time include the periodic evaluations.")
  if FLAGS.overrides:
    note += f" Overrides: {', '.join(FLAGS.overrides)}."
  if FLAGS.readme:
    _write_readme(FLAGS.readme, table, note)
    print(f"table written to {FLAGS.readme}")


if __name__ == "__main__":
  app.run(main)
