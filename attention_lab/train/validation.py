"""Checks a whole experiment config before any work starts.

A bad value used to surface late, or never: ``total_steps=-5`` trained nothing
and wrote a 10% ``results.json``, an unknown kernel failed deep inside JAX's
tracing, ``batch_size=0`` in the input pipeline. ``problems(config)`` looks at
every field the loop reads and returns one line per problem, each naming the
field, its value and what is allowed; ``validate(config)`` raises them as one
``ConfigError``. ``run.py`` and ``train.train_and_evaluate`` (and the eval and
visualize modes) call it before touching TensorFlow, JAX devices or the
work directory.

Importing this module imports JAX and Flax (through the model and kernel
registries, which own the lists of names) but never TensorFlow, so a config
error does not wait for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Iterable, List, Optional, Sequence

from attention_lab import data as data_lib
from attention_lab import kernels
from attention_lab import models
from attention_lab.data import sources
from attention_lab.layers.conv_attention import CONV_ATTENTIONS
from attention_lab.layers import AttentionConfig
from attention_lab.models.seq2seq import SCORES as SEQ2SEQ_SCORES
from attention_lab.train import sharding
from attention_lab.train import tasks as tasks_lib
from attention_lab.viz import drawers

# optim.make_optimizer builds these (it raises on any other name).
OPTIMIZERS = ("adamw",)

# Fields that count things: a zero or negative value has no meaning.
POSITIVE_INTS = ("total_steps", "batch_size", "eval_batch_size", "log_every", "eval_every",
                 "checkpoint_every", "keep_checkpoints")
# Model fields (whichever models have them) that count or size things.
MODEL_POSITIVE_INTS = ("num_classes", "vocab_size", "target_length", "hidden_dim",
                       "num_layers", "num_heads", "mlp_dim", "embed_dim", "attention_units",
                       "patch_size", "levels", "blocks_per_stage", "reduction",
                       "spatial_kernel", "num_mels", "conv_kernel_size",
                       "subsample_channels", "max_distance", "num_encoder_layers",
                       "num_decoder_layers", "num_queries", "stem_stride")
MODEL_NON_NEGATIVE_INTS = ("time_masks", "time_width", "freq_masks", "freq_width")
MODEL_RATES = ("dropout_rate",)     # probabilities in [0, 1)


class ConfigError(ValueError):
  """A config with values the loop cannot run; ``lines`` has one per problem."""

  def __init__(self, lines: Sequence[str]):
    self.lines = list(lines)
    super().__init__("\n".join(self.lines))


def validate(config) -> None:
  """Raises ``ConfigError`` (a ValueError) listing every problem of ``config``."""
  lines = problems(config)
  if lines:
    raise ConfigError(lines)


def validate_devices(config) -> None:
  """Raises ``ConfigError`` listing ``device_problems(config)``."""
  lines = device_problems(config)
  if lines:
    raise ConfigError(lines)


def device_problems(config) -> List[str]:
  """The problems only the devices show, once JAX has started: the mesh
  against the device count, and a kernel named for every platform against
  the one this process runs on. Same line format as ``problems``."""
  import jax
  found: List[str] = []
  check = _Checker(config, found)
  devices = jax.device_count()
  sequence, data = check.value("mesh.sequence"), check.value("mesh.data")
  # Only sizes problems() accepts: the rest are named there.
  misfit = (sharding.mesh_misfit(data, sequence, devices)
            if _is_int(sequence) and sequence >= 1 and _is_int(data) and (data >= 1 or data == -1)
            else None)
  if misfit == "sequence":
    check.problem("mesh.sequence", f"must divide the device count ({devices})")
  elif misfit == "data":
    check.problem("mesh.data", f"times config.mesh.sequence ({sequence}) must equal the "
                  f"device count ({devices}); -1 takes every device the sequence axis leaves")
  kernel = check.value("model.attention.kernel")
  try:
    choice = kernels.registry.parse_choice(kernel)
  except ValueError:
    choice = None                     # problems() names it
  platform = jax.default_backend()
  if isinstance(choice, str):
    spec = kernels.registry.get(choice)
    if platform not in spec.platforms:
      check.problem("model.attention.kernel", f"attention kernel {choice!r} does not run on "
                    f"{platform} (platforms: {', '.join(spec.platforms)}); pin it to its "
                    f"platform instead, e.g. '{spec.platforms[0]}={choice}'")
  return found


def problems(config) -> List[str]:
  """One line per problem: ``config.FIELD=VALUE: what is allowed``.

  Only fields are read; nothing is built, traced or written.
  """
  found: List[str] = []
  check = _Checker(config, found)

  for field in POSITIVE_INTS:
    check.integer(field, minimum=1)
  check.integer("seed", minimum=None)
  check.number("label_smoothing", low=0.0, high=1.0, high_open=True)
  check.one_of("task", sorted(tasks_lib.TASKS))
  for field in ("debug_nans", "distributed", "async_checkpoints"):
    check.boolean(field)

  _optimizer(check)
  _data(check)
  _mesh(check)
  _model(check)
  if check.value("task") == "detection":
    _detection(check)
  check.one_of("viz.kind", sorted(drawers.DRAWERS))
  check.integer("viz.num_examples", minimum=1)
  return found


def _optimizer(check: "_Checker") -> None:
  check.one_of("optimizer.name", OPTIMIZERS)
  check.number("optimizer.learning_rate", low=0.0, low_open=True)
  # A warm-up longer than the run ends it before the learning rate reaches
  # optimizer.learning_rate. Equal is allowed on purpose: the whole run is
  # warm-up, which short smoke runs (total_steps=2) rely on.
  total = check.value("total_steps")
  check.integer("optimizer.warmup_steps", minimum=0,
                maximum=total if _is_int(total) and total >= 1 else None,
                maximum_says=f"total_steps ({total}): a longer warm-up ends the run "
                             "before the learning rate reaches optimizer.learning_rate")
  check.number("optimizer.end_factor", low=0.0)
  check.number("optimizer.weight_decay", low=0.0)
  check.number("optimizer.b1", low=0.0, high=1.0, high_open=True)
  check.number("optimizer.b2", low=0.0, high=1.0, high_open=True)
  check.number("optimizer.grad_clip", low=0.0, low_open=True)


def _data(check: "_Checker") -> None:
  name = check.value("data.name")
  if not isinstance(name, str) or not name:
    check.problem("data.name", f"must name a dataset: {_known(data_lib.DATASETS)}")
  else:
    base, _, builder_config = name.partition("/")
    if base not in data_lib.DATASETS:
      check.problem("data.name", f"unknown dataset; {_known(data_lib.DATASETS)}"
                    f"{_did_you_mean(base, data_lib.DATASETS)}")
    elif builder_config and base in sources.LOCAL_BUILDERS:
      configs = [c.name for c in sources.LOCAL_BUILDERS[base].BUILDER_CONFIGS or []]
      if builder_config not in configs:
        check.problem("data.name", f"{base} has no builder config {builder_config!r}; "
                      f"known: {', '.join(configs) if configs else '(none)'}")
  for split in ("data.train_split", "data.eval_split"):
    value = check.value(split)
    if not isinstance(value, str) or not value.strip():
      check.problem(split, "must be a TFDS split such as 'train' or 'test[:50]'")
  check.integer("data.augment_shift", minimum=0)
  check.integer("data.max_length", minimum=0)
  check.integer("data.prefetch", minimum=0)
  for field in ("data.augment_flip", "data.grayscale"):
    check.boolean(field)


def _detection(check: "_Checker") -> None:
  """The detection task's fields: its loss weights, the image size and the
  objects kept per image, which the queries must outnumber or equal."""
  for field in ("class_weight", "l1_weight", "giou_weight"):
    check.number(f"detection.{field}", low=0.0)
  check.number("detection.no_object_weight", low=0.0, low_open=True)
  check.boolean("detection.aux_loss")
  check.integer("data.image_size", minimum=1)
  check.integer("data.max_objects", minimum=1)
  queries, most = check.value("model.num_queries"), check.value("data.max_objects")
  if _is_int(queries) and _is_int(most) and queries >= 1 and most > queries:
    check.problem("data.max_objects", f"must be at most model.num_queries ({queries}): "
                  "each object is matched to a query of its own")


def _mesh(check: "_Checker") -> None:
  data = check.value("mesh.data")
  if not (_is_int(data) and (data == -1 or data >= 1)):
    check.problem("mesh.data", "must be a device count >= 1, or -1 for every device "
                  "the sequence axis leaves")
  check.integer("mesh.sequence", minimum=1)
  check.boolean("mesh.shard_params")
  batch = check.value("batch_size")
  # The device count itself is known only once JAX starts (sharding.make_mesh
  # checks it); a fixed data axis must divide the batch already.
  if _is_int(data) and data >= 1 and _is_int(batch) and batch >= 1 and batch % data:
    check.problem("batch_size", f"must divide by mesh.data ({data}): each device of the "
                  "data axis takes an equal share")


def _model(check: "_Checker") -> None:
  name = check.value("model.name")
  if name not in models.MODELS:
    check.problem("model.name", f"unknown model; {_known(models.MODELS)}"
                  f"{_did_you_mean(name, models.MODELS)}")
    return
  fields = {f.name: f for f in dataclasses.fields(models.MODELS[name])
            if f.name not in ("parent", "name")}
  given = check.keys("model")
  for key in sorted(set(given) - set(fields) - {"name"}):
    check.problem(f"model.{key}", f"model {name!r} has no such field; its fields: "
                  f"{', '.join(sorted(fields))}{_did_you_mean(key, fields)}")
  for key, field in sorted(fields.items()):
    required = (field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING)
    if required and key not in given:
      check.missing(f"model.{key}", f"model {name!r} needs it")

  present = lambda key: key in given and key in fields
  if present("attention") and models.takes_attention_config(models.MODELS[name]):
    _attention(check)
    _model_attention(check, name)
  if present("score") and name == "seq2seq":
    check.one_of("model.score", SEQ2SEQ_SCORES)
  if present("conv_attention"):
    check.one_of("model.conv_attention", CONV_ATTENTIONS)
  if present("doubly_stochastic"):          # a weight on a penalty: a negative one rewards it
    check.number("model.doubly_stochastic", low=0.0)
  dtypes = getattr(models, "COMPUTE_DTYPE_NAMES", None)   # names models.build accepts
  if present("dtype") and dtypes is not None:
    check.one_of("model.dtype", sorted(dtypes))
  for key in MODEL_POSITIVE_INTS:
    if present(key):
      check.integer(f"model.{key}", minimum=1)
  for key in MODEL_NON_NEGATIVE_INTS:
    if present(key):
      check.integer(f"model.{key}", minimum=0)
  for key in MODEL_RATES:
    if present(key):
      check.number(f"model.{key}", low=0.0, high=1.0, high_open=True)
  if present("widths"):
    widths = check.value("model.widths")
    if not (isinstance(widths, (tuple, list)) and widths
            and all(_is_int(w) and w >= 1 for w in widths)):
      check.problem("model.widths", "must be a non-empty tuple of positive integers")
  hidden, heads = check.value("model.hidden_dim"), check.value("model.num_heads")
  if (present("hidden_dim") and present("num_heads") and _is_int(hidden) and _is_int(heads)
      and hidden >= 1 and heads >= 1 and hidden % heads):
    check.problem("model.num_heads", f"must divide model.hidden_dim ({hidden}): each head "
                  "takes an equal slice of it")


def _attention(check: "_Checker") -> None:
  """``config.model.attention``: the fields of ``AttentionConfig``, each value
  checked as the layers will use it."""
  known = {f.name for f in dataclasses.fields(AttentionConfig)}
  given = check.keys("model.attention")
  for key in sorted(set(given) - known):
    check.problem(f"model.attention.{key}", f"attention has no such field; its fields: "
                  f"{', '.join(sorted(known))}{_did_you_mean(key, known)}")
  kernel = check.value("model.attention.kernel")
  if kernel is not None:
    try:
      kernels.registry.parse_choice(kernel)
    except ValueError as e:
      # ml_collections reads --config.model.attention.kernel=None as the string "None".
      hint = ("; 'None' on the command line is a string: leave the flag out instead"
              if kernel == "None" else _did_you_mean(kernel, kernels.names()))
      check.problem("model.attention.kernel", f"{e}; or None (unset) for each platform's "
                    f"automatic choice{hint}")
  if "dropout_rate" in given:
    check.number("model.attention.dropout_rate", low=0.0, high=1.0, high_open=True)
  settings = {k: check.value(f"model.attention.{k}") for k in given
              if k in known and k not in ("kernel", "dropout_rate")}
  try:
    problems = AttentionConfig(**settings).problems()
  except (TypeError, ValueError) as e:
    problems = [str(e).removeprefix("AttentionConfig: ")]
  for problem in problems:
    field = problem.split(":")[0].split(" ")[0]
    path = f"model.attention.{field}" if field in known else "model.attention"
    check.problem(path, problem)


def _model_attention(check: "_Checker", name: str) -> None:
  """The attention settings that depend on the model: grouped K/V heads must
  split its heads evenly, 2-D rotary needs its tokens on a patch grid, and a
  model may refuse settings its layers lack (``attention_problems``)."""
  cls = models.MODELS[name]
  heads = check.value("model.num_heads")
  kv_heads = check.value("model.attention.num_kv_heads")
  if (_is_int(heads) and heads >= 1 and _is_int(kv_heads) and kv_heads >= 1
      and heads % kv_heads):
    check.problem("model.attention.num_kv_heads", f"must divide model.num_heads ({heads}): "
                  "each K/V head serves an equal group of query heads")
  if check.value("model.attention.rotary") == "2d" and not getattr(cls, "PATCH_GRID", False):
    on_grid = sorted(n for n, c in models.MODELS.items() if getattr(c, "PATCH_GRID", False))
    check.problem("model.attention.rotary", f"'2d' turns queries and keys by their row and "
                  f"column in a patch grid, which model {name!r} does not have (models "
                  f"with one: {', '.join(on_grid)}); use '1d' for sequences")
  refuse = getattr(cls, "attention_problems", None)
  if refuse is not None:
    try:
      settings = AttentionConfig.from_config(check.value("model.attention"))
    except (TypeError, ValueError):
      return                          # _attention has named what is wrong
    for field, problem in refuse(settings):
      check.problem(f"model.attention.{field}", problem)


def dotted_keys(config, prefix: str = "", sections: bool = False) -> List[str]:
  """Every field of a ConfigDict as a dotted path (``optimizer.learning_rate``);
  with ``sections``, the nested dicts' own paths (``optimizer``) too."""
  keys = []
  for key in config.keys():
    path = f"{prefix}{key}"
    child = config[key]
    if _is_section(child):
      keys.extend(([path] if sections else []) + dotted_keys(child, f"{path}.", sections))
    else:
      keys.append(path)
  return sorted(keys)


def has_key(config, path: str) -> bool:
  """Whether dotted ``path`` names a field of ``config`` (``[i]`` indices ignored)."""
  node = config
  for part in path.split("."):
    part = part.split("[", 1)[0]
    if not (_is_section(node) and part in node.keys()):
      return False
    node = node[part]
  return True


def unknown_key(path: str, value: Optional[str], config) -> str:
  """The line for an override of a field ``config`` lacks: the closest fields
  of the whole config, else the fields of the section it names."""
  shown = f"config.{path}" + (f"={value}" if value is not None else "")
  experiment = config.get("experiment") or "this experiment"
  line = f"{shown}: {experiment}'s config has no field {path!r}"
  suggestion = _did_you_mean(path, dotted_keys(config), n=2, prefix="config.")
  if suggestion:
    return line + suggestion
  parent = path.rpartition(".")[0]
  if parent and has_key(config, parent):
    node = config
    for part in parent.split("."):
      node = node[part]
    return line + f"; config.{parent} has: {', '.join(sorted(node.keys()))}"
  sections = [k for k in sorted(config.keys()) if _is_section(config[k])]
  return line + f"; its sections: {', '.join(sections)}"


def _is_section(node) -> bool:
  return hasattr(node, "keys") and callable(node.keys)


def _did_you_mean(value: Any, choices: Iterable[str], n: int = 1, prefix: str = "") -> str:
  """``; did you mean X?`` for the ``n`` closest choices to ``value``, or "".

  Dotted paths are matched by their last part, so ``learning_rate`` finds
  ``optimizer.learning_rate`` and ``mdel.kernel`` finds ``model.kernel``.
  """
  if not isinstance(value, str) or not value:
    return ""
  parent, _, leaf = value.rpartition(".")
  scored = []
  for choice in choices:
    choice_parent, _, choice_leaf = choice.rpartition(".")
    # By the last part alone: the whole path would rate any two fields of one
    # section as close ("model.depthh" and "model.dtype").
    score = difflib.SequenceMatcher(None, leaf.lower(), choice_leaf.lower()).ratio()
    if choice != value and score >= 0.6:
      scored.append((choice_parent != parent, -score, choice))   # same section first
  unique = [choice for *_, choice in sorted(scored)[:n]]
  if not unique:
    return ""
  return "; did you mean " + " or ".join(f"{prefix}{c}" for c in unique) + "?"


def _known(names: Iterable[str]) -> str:
  return f"known: {', '.join(sorted(names))}"


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


class _Checker:
  """Reads fields by dotted path and words the problems alike."""

  def __init__(self, config, found: List[str]):
    self.config = config
    self.found = found

  def keys(self, path: str) -> List[str]:
    node = self._node(path)
    return list(node.keys()) if node is not None and hasattr(node, "keys") else []

  def _node(self, path: str):
    node = self.config
    for part in path.split("."):
      if not (hasattr(node, "keys") and part in node.keys()):
        return None
      node = node[part]
    return node

  def value(self, path: str):
    return self._node(path)

  def problem(self, path: str, allowed: str) -> None:
    value = self.value(path)
    if _is_section(value) and hasattr(value, "to_dict"):
      value = value.to_dict()        # a ConfigDict's own repr spans lines
    self.found.append(f"config.{path}={value!r}: {allowed}")

  def missing(self, path: str, why: str) -> None:
    self.found.append(f"config.{path} is missing: {why}")

  def one_of(self, path: str, allowed: Sequence[str]) -> None:
    value = self.value(path)
    if value not in allowed:
      self.problem(path, f"must be one of {', '.join(allowed)}{_did_you_mean(value, allowed)}")

  def integer(self, path: str, minimum: Optional[int], maximum: Optional[int] = None,
              maximum_says: str = "") -> None:
    value = self.value(path)
    if not _is_int(value):
      self.problem(path, "must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
    elif minimum is not None and value < minimum:
      self.problem(path, "must be a positive integer" if minimum == 1 else
                   f"must be an integer >= {minimum}")
    elif maximum is not None and value > maximum:
      self.problem(path, f"must be at most {maximum_says or maximum}")

  def number(self, path: str, low: Optional[float] = None, high: Optional[float] = None,
             low_open: bool = False, high_open: bool = False) -> None:
    value = self.value(path)
    too_low = low is not None and _is_number(value) and (
        value <= low if low_open else value < low)
    too_high = high is not None and _is_number(value) and (
        value >= high if high_open else value > high)
    if not _is_number(value) or too_low or too_high:
      bounds = []
      if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
      if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
      self.problem(path, "must be a finite number" + (f" {' and '.join(bounds)}"
                                                      if bounds else ""))

  def boolean(self, path: str) -> None:
    if not isinstance(self.value(path), bool):
      self.problem(path, "must be True or False")


__all__ = ["ConfigError", "device_problems", "dotted_keys", "has_key", "problems", "unknown_key",
           "validate", "validate_devices"]
