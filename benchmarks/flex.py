"""score_mod / mask_mod speed: what a hook costs, and what block sparsity saves.

    python benchmarks/flex.py                      # 1024..4096 tokens, 5 rounds
    python benchmarks/flex.py --quick              # tiny sizes: checks the script runs
    python benchmarks/flex.py --lengths=4096 --repeats=7 --nobackward

All cases run our ``blockwise`` kernel (batch 1, 8 heads, head_dim 64,
float32 by default) in one process, side by side:

- ``causal``: ``is_causal=True``, the fast path with no hook (the baseline of
  the next three);
- ``causal mask_mod``: the same mask as ``mods.causal()``: the general block
  mask path (skips the upper blocks, no masking in full blocks);
- ``causal+alibi``: ``is_causal`` and ``score_mod=mods.alibi(heads)``;
- ``causal+softcap``: ``is_causal`` and ``score_mod=mods.softcap(20)``;
- ``causal window``: ``is_causal`` and ``local_window_size=(--window, 0)``,
  a sliding window of that many earlier keys (visited blocks start where
  the window starts);
- ``documents mask_mod``: ``--documents`` packed documents of random lengths
  as ``mods.document(ids)`` with NumPy ids (a static block mask: blocks
  between documents are skipped); the baseline of the next two;
- ``documents traced ids``: the same ids passed into ``jit``: the mask_mod is
  evaluated in every block, nothing is skipped;
- ``documents dense mask``: the same mask as a dense boolean
  ``[1, 1, L, L]`` ``mask=`` argument.

With torch importable, PyTorch's ``flex_attention`` compiled with
``torch.compile`` runs beside every case it expresses (the same score_mod,
or a ``create_block_mask`` block mask; a dense mask it has no place for), on
the same number of threads, forward only: torch's CPU FlexAttention has no
backward (it raises ``NotImplementedError``). Its compile takes tens of
seconds per case and length. ``vs flex`` is torch's median over ours (above
1.0 = ours faster).

After one compile/warm-up call each, ``--repeats`` rounds time every case
once, the order rotating by one each round (as ``benchmarks/kernels.py``).
A cell is the median milliseconds with the min-max spread; ``vs`` is the
case's median over its baseline's (below 1.0 = faster than the baseline),
marked "within noise" when the two spreads overlap.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import timing  # noqa: E402
from benchmarks.timing import Spread  # noqa: E402
from benchmarks.timing import cpu_description  # noqa: E402
from benchmarks.timing import pin_threads  # noqa: E402
from benchmarks.timing import time_rotating  # noqa: E402

flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "sequence lengths")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("head_dim", 64, "head width")
flags.DEFINE_integer("documents", 8, "packed documents in the document-mask cases")
flags.DEFINE_integer("window", 256, "earlier keys each query sees in the causal window case")
flags.DEFINE_integer("repeats", 5, "timed rounds per measurement (median, min-max)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "inputs")
flags.DEFINE_integer("threads", 0, "CPUs to pin the process to; 0: all it may use")
flags.DEFINE_bool("backward", True, "also time forward+backward (gradients wrt q, k, v)")
flags.DEFINE_list("cases", [], "cases to run (default: all)")
flags.DEFINE_bool("quick", False, "tiny sizes and few rounds: checks the script runs, "
                  "its numbers mean nothing")
flags.DEFINE_bool("torch", True, "time PyTorch's compiled flex_attention (forward) beside "
                  "each case it expresses, when torch is importable")
FLAGS = flags.FLAGS

# --quick leaves torch's flex out: its compile alone takes minutes.
QUICK = {"lengths": ["256"], "heads": 2, "head_dim": 32, "repeats": 3, "torch": False}
# case -> its baseline (the ratio column divides by the baseline's median).
BASELINE = {
    "causal": None, "causal mask_mod": "causal", "causal+alibi": "causal",
    "causal+softcap": "causal", "causal window": "causal", "documents mask_mod": None,
    "documents traced ids": "documents mask_mod", "documents dense mask": "documents mask_mod",
}


def document_ids(length: int, count: int, seed: int = 0):
  """int32 ``[batch, length]``: ``count`` contiguous documents of random lengths."""
  import numpy as np
  rng = np.random.default_rng(seed)
  count = max(1, min(count, length))
  cuts = np.sort(rng.choice(np.arange(1, length), count - 1, replace=False))
  row = np.searchsorted(cuts, np.arange(length), side="right").astype(np.int32)
  return np.tile(row, (FLAGS.batch, 1))


def make_cases(length: int) -> Dict[str, Tuple[Callable, tuple]]:
  """case -> (attention(q, k, v, *extra), extra arguments)."""
  import jax.numpy as jnp
  from attention_lab import kernels
  from attention_lab.kernels import mods

  ids = document_ids(length, FLAGS.documents)
  dense = jnp.asarray(ids[:, None, :, None] == ids[:, None, None, :])   # [b, 1, L, L]
  attend = lambda q, k, v, **kw: kernels.dot_product_attention(
      q, k, v, implementation="blockwise", **kw)
  cases = {
      "causal": (lambda q, k, v: attend(q, k, v, is_causal=True), ()),
      "causal mask_mod": (lambda q, k, v: attend(q, k, v, mask_mod=mods.causal()), ()),
      "causal+alibi": (lambda q, k, v: attend(q, k, v, is_causal=True,
                                              score_mod=mods.alibi(FLAGS.heads)), ()),
      "causal+softcap": (lambda q, k, v: attend(q, k, v, is_causal=True,
                                                score_mod=mods.softcap(20.0)), ()),
      "causal window": (lambda q, k, v: attend(q, k, v, is_causal=True,
                                               local_window_size=(FLAGS.window, 0)), ()),
      "documents mask_mod": (lambda q, k, v: attend(q, k, v, mask_mod=mods.document(ids)), ()),
      "documents traced ids": (lambda q, k, v, t: attend(q, k, v, mask_mod=mods.document(t)),
                               (jnp.asarray(ids),)),
      "documents dense mask": (lambda q, k, v, m: attend(q, k, v, mask=m), (dense,)),
  }
  chosen = FLAGS.cases or list(cases)
  unknown = sorted(set(chosen) - set(cases))
  if unknown:
    raise app.UsageError(f"unknown --cases {unknown}; cases: {', '.join(cases)}")
  return {name: cases[name] for name in chosen}


def torch_flex_cases(length: int, q, k, v):
  """case -> forward closure of torch's compiled ``flex_attention`` on the
  same inputs (heads-major copies), for the cases it expresses; ``{}``
  without torch."""
  try:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention
  except ImportError:
    return {}
  import numpy as np
  from attention_lab.kernels import mods
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  as_torch = lambda x: torch.from_numpy(np.asarray(x, np.float32).transpose(0, 2, 1, 3).copy())
  tq, tk, tv = as_torch(q), as_torch(k), as_torch(v)
  ids = torch.from_numpy(document_ids(length, FLAGS.documents))
  slopes = torch.from_numpy(np.asarray(mods.alibi_slopes(FLAGS.heads)))
  causal = lambda b, h, qi, ki: qi >= ki
  documents = lambda b, h, qi, ki: ids[b, qi] == ids[b, ki]
  window = lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= FLAGS.window)
  alibi = lambda s, b, h, qi, ki: s + slopes[h] * (ki - qi)
  softcap = lambda s, b, h, qi, ki: 20.0 * torch.tanh(s / 20.0)
  block = lambda fn, batch: create_block_mask(fn, batch, None, length, length, device="cpu")
  causal_blocks, doc_blocks = block(causal, None), block(documents, FLAGS.batch)
  window_blocks = block(window, None)
  compiled = torch.compile(flex_attention)

  def run(**kw):
    def forward():
      with torch.no_grad():
        return compiled(tq, tk, tv, **kw)
    return forward

  cases = {"causal": run(block_mask=causal_blocks),
           "causal mask_mod": run(block_mask=causal_blocks),
           "causal+alibi": run(score_mod=alibi, block_mask=causal_blocks),
           "causal+softcap": run(score_mod=softcap, block_mask=causal_blocks),
           "causal window": run(block_mask=window_blocks),
           "documents mask_mod": run(block_mask=doc_blocks),
           "documents traced ids": run(block_mask=doc_blocks)}
  return {name: fn for name, fn in cases.items() if name in (FLAGS.cases or cases)}


def runners(fn, extra, q, k, v):
  """(forward, forward+backward) closures that block until done."""
  import jax
  import jax.numpy as jnp
  fwd = jax.jit(fn)
  loss = lambda q, k, v, *extra: jnp.sum(fn(q, k, v, *extra).astype(jnp.float32))
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return (lambda: jax.block_until_ready(fwd(q, k, v, *extra)),
          lambda: jax.block_until_ready(bwd(q, k, v, *extra)))


def ratio(spreads: Dict[str, Spread], name: str) -> str:
  base = BASELINE.get(name)
  if base is None or base not in spreads or name not in spreads:
    return "-"
  text = f"{spreads[name].median / spreads[base].median:.2f}x {base}"
  return text + (" within noise" if spreads[name].overlaps(spreads[base]) else "")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.WARNING)
  if FLAGS.quick:
    timing.apply_quick(FLAGS, QUICK)
  _, cpus = pin_threads(FLAGS.threads)       # before JAX sizes its thread pool
  import jax
  import jaxlib
  import numpy as np
  from attention_lab.kernels import blockwise
  from attention_lab.kernels import masks
  from attention_lab.kernels import mods
  from attention_lab.kernels import tuning

  print(f"machine: {cpu_description()}; {len(cpus)} of {os.cpu_count()} CPUs used; "
        f"jax {jax.__version__} (jaxlib {jaxlib.__version__}) on {jax.default_backend()}")
  print(timing.tuning_line())
  if FLAGS.quick:
    print("(--quick: tiny sizes and rounds; these numbers only show that the script runs)")
  print(f"blockwise, batch {FLAGS.batch}, heads {FLAGS.heads}, head_dim {FLAGS.head_dim}, "
        f"{FLAGS.dtype}; {FLAGS.documents} documents; ms as median (min-max) "
        f"of {FLAGS.repeats} rounds, order rotated each round")
  header = "| length | case | skipped blocks | fwd ms | fwd vs | "
  header += "fwd+bwd ms | fwd+bwd vs |" if FLAGS.backward else ""
  header += " torch flex fwd ms | vs flex | max abs diff |" if FLAGS.torch else ""
  header = header.replace("|  ", "| ")
  print(header)
  print("|" + "---|" * (header.count("|") - 1), flush=True)
  dtype = jax.numpy.dtype(FLAGS.dtype)
  for length in [int(x) for x in FLAGS.lengths if x]:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (FLAGS.batch, length, FLAGS.heads, FLAGS.head_dim), dtype)
               for key in keys)
    cases = make_cases(length)
    fwd, bwd = {}, {}
    for name, (fn, extra) in cases.items():
      fwd[name], bwd[name] = runners(fn, extra, q, k, v)
    flex = torch_flex_cases(length, q, k, v) if FLAGS.torch else {}
    # torch's flex runs in the same rotation as ours (one candidate per case).
    f_times, _ = time_rotating({**fwd, **{f"torch {n}": f for n, f in flex.items()}},
                               FLAGS.repeats)
    b_times = time_rotating(bwd, FLAGS.repeats)[0] if FLAGS.backward else {}
    ids = document_ids(length, FLAGS.documents)
    # The blocks blockwise runs these banded cases with (tuned or default).
    block_q, block_k = (tuning.blocks(True, length, FLAGS.head_dim)
                        or blockwise.DEFAULT_BLOCKS[True])
    block_q, block_k = min(block_q, length), min(block_k, length)
    static = {"causal mask_mod": mods.causal(), "documents mask_mod": mods.document(ids)}
    for name in cases:
      table = (masks.block_mask(static[name], FLAGS.batch, FLAGS.heads, length, length,
                                block_q, block_k) if name in static else None)
      skipped = f"{table.sparsity:.0%}" if table is not None else "-"
      line = (f"| {length} | {name} | {skipped} | {f_times[name].ms()} | "
              f"{ratio(f_times, name)} |")
      if FLAGS.backward:
        line += f" {b_times[name].ms()} | {ratio(b_times, name)} |"
      if FLAGS.torch:
        theirs = f_times.get(f"torch {name}")
        if theirs is None:
          line += " - | - | - |"
        else:
          # The same attention? Our output against torch's (heads-major back).
          diff = abs(np.asarray(fwd[name]()) -
                     flex[name]().numpy().transpose(0, 2, 1, 3)).max()
          line += (f" {theirs.ms()} | {theirs.median / f_times[name].median:.2f}"
                   f"{' within noise' if theirs.overlaps(f_times[name]) else ''} | {diff:.1e} |")
      print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
