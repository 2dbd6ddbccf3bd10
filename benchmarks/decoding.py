"""Greedy decoding speed: key/value cache against recomputing the prefix.

    python benchmarks/decoding.py                  # 16..256 output tokens, batch 32
    python benchmarks/decoding.py --quick          # tiny sizes: checks the script runs
    python benchmarks/decoding.py --lengths=32,512 --batch=8 --repeats=5

The model is ``numbers_transformer``'s (``models.transformer_seq2seq``: 2 + 2
layers, width 128, 4 heads, MLP 256), randomly initialised: speed does not
depend on the weights. A source of 56 characters (the longest English number
of the corpus) is translated into ``L`` output tokens, all written (no early
stop at ``<eos>``), two ways, each one jit-compiled ``scan``:

- ``cached``: ``TransformerSeq2Seq.generate``: each step projects one token
  and attends over a ``[batch, L, heads, head_dim]`` cache: a step costs
  about the same at any ``L`` (only its attention reads grow with ``L``);
- ``recompute``: ``generate_by_recompute``: each step runs the decoder over
  all ``L`` positions (the prefix, padding hidden by the causal mask) and
  reads one: a step costs ``O(L)`` and a translation ``O(L^2)``.

After one compile/warm-up call each, ``--repeats`` rounds time both, the
order rotated each round; a cell is the median milliseconds per output position
(a batch's translation time / ``L``; the batch writes ``batch`` tokens per
position), with min-max. The 1-minute load average is printed
before and after: above the CPUs used, other work shared the machine while
timing and the absolute numbers are inflated (the ratio less so).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import timing  # noqa: E402
from benchmarks.timing import Spread  # noqa: E402

flags.DEFINE_list("lengths", ["16", "32", "64", "128", "256"], "output tokens per translation")
flags.DEFINE_integer("batch", 32, "translations decoded at once")
flags.DEFINE_integer("source_length", 56, "source characters (56: the corpus' longest)")
flags.DEFINE_integer("repeats", 3, "timed rounds per measurement (median, min-max)")
flags.DEFINE_bool("quick", False, "tiny sizes and few rounds: checks the script runs, "
                  "its numbers mean nothing")
FLAGS = flags.FLAGS

QUICK = {"lengths": ["4", "8"], "batch": 2, "repeats": 1}
# numbers_transformer's model (experiments/numbers_transformer.py).
MODEL = {"num_layers": 2, "num_heads": 4, "hidden_dim": 128, "mlp_dim": 256}
QUICK_MODEL = {"num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 16}



def decoders(length: int, batch: int, source_length: int,
             model_fields: Dict[str, int]) -> Dict[str, Callable[[], object]]:
  """``{"cached": fn, "recompute": fn}``: each call translates one batch of
  random sources into ``length`` tokens and waits for the result."""
  import jax
  import numpy as np
  from attention_lab.data import numbers
  from attention_lab.models.transformer_seq2seq import TransformerSeq2Seq

  model = TransformerSeq2Seq(vocab_size=len(numbers.CHARS), target_length=length,
                             **model_fields)
  rng = np.random.default_rng(0)
  source = rng.integers(3, len(numbers.CHARS), (batch, source_length)).astype(np.int32)
  inputs = {"source": source, "target": np.zeros((batch, length), np.int32)}
  variables = jax.jit(lambda k: model.init(k, inputs, train=True))(jax.random.key(0))
  runs = {}
  for name, method in (("cached", model.generate), ("recompute", model.generate_by_recompute)):
    fn = jax.jit(lambda v, s, method=method: model.apply(v, s, method=method)["tokens"])
    runs[name] = lambda fn=fn: jax.block_until_ready(fn(variables, source))
  return runs


def measure(lengths: Sequence[int], batch: int, source_length: int, repeats: int,
            model_fields: Dict[str, int]) -> List[Tuple[int, Spread, Spread]]:
  """``[(L, cached seconds per token, recompute seconds per token)]``, timed
  side by side (``timing.time_rotating``: rounds rotated, medians and spread)."""
  rows = []
  for length in lengths:
    spreads, failed = timing.time_rotating(
        decoders(length, batch, source_length, model_fields), repeats)
    if failed:
      raise RuntimeError(f"decoding {length} tokens failed: {failed}")
    per_token = {name: Spread(tuple(t / length for t in spread.times))
                 for name, spread in spreads.items()}
    rows.append((length, per_token["cached"], per_token["recompute"]))
  return rows


def table(rows: List[Tuple[int, Spread, Spread]]) -> List[str]:
  """Markdown rows: ms per generated token, median (min-max), and the ratio."""
  cell = lambda s: f"{s.median * 1e3:.2f} ({min(s.times) * 1e3:.2f}-{max(s.times) * 1e3:.2f})"
  lines = ["| output tokens | cached ms/token | recompute ms/token | recompute / cached |",
           "|---|---|---|---|"]
  for length, cached, recompute in rows:
    lines.append(f"| {length} | {cell(cached)} | {cell(recompute)} | "
                 f"{recompute.median / cached.median:.1f}x |")
  return lines


def load_line(when: str, cpus: int) -> str:
  load = os.getloadavg()[0]
  shared = (f" (above the {cpus} CPUs: the machine was shared while timing)"
            if load > cpus else "")
  return f"load average (1 min) {when}: {load:.2f}{shared}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if FLAGS.quick:
    timing.apply_quick(FLAGS, QUICK)
  import jax
  lengths = [int(x) for x in FLAGS.lengths if x]
  if not lengths or min(lengths) < 1:
    raise app.UsageError(f"--lengths must be positive integers, got {FLAGS.lengths}")
  cpus = len(os.sched_getaffinity(0))
  fields = QUICK_MODEL if FLAGS.quick else MODEL
  print(f"machine: {timing.cpu_description()}; {cpus} of {os.cpu_count()} CPUs; "
        f"jax {jax.__version__} on {jax.default_backend()}")
  print(load_line("before", cpus))
  if FLAGS.quick:
    print("(--quick: tiny sizes and rounds; these numbers only show that the script runs)")
  print(f"transformer_seq2seq {fields}, batch {FLAGS.batch}, source {FLAGS.source_length} "
        f"characters, float32; ms per generated token (translation time / output tokens) as "
        f"median (min-max) of {FLAGS.repeats} rounds")
  rows = measure(lengths, FLAGS.batch, FLAGS.source_length, FLAGS.repeats, fields)
  print("\n".join(table(rows)))
  print(load_line("after", cpus))


if __name__ == "__main__":
  app.run(main)
