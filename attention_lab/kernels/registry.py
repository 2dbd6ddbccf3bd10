"""The kernel registry: each kernel's capabilities, and each platform's order.

Capabilities are data (``KernelSpec``), so dispatch, tests and error messages
read them instead of guessing. The per-platform preference is one explicit
table at the bottom of ``attention_lab/kernels/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from attention_lab.kernels import checks

FEATURES = ("mask", "bias", "causal", "window", "dropout", "weights", "residual",
            "score_mod", "mask_mod")
PLATFORMS = ("cpu", "gpu", "tpu")
# The function a kernel computes: exact softmax attention (checked against
# float64 softmax), or another attention with its own definition (checked
# against that definition, and drawn with its own weights).
SOFTMAX = "softmax"


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """A registered kernel and what it can do.

  Attributes:
    name: registry name, used by ``config.model.attention.kernel``.
    fn: the pure function (kernel contract, see ``attention_lab.kernels``).
    features: subset of ``FEATURES`` it supports.
    platforms: platforms it lowers for.
    dtypes: input dtypes it accepts.
    description: one line for listings.
    applies: optional ``fn(AttentionShape) -> bool``: automatic dispatch
      skips the kernel when it says no (a hard limit such as cuDNN's head
      sizes, or shapes where the next kernel is measurably faster). An
      explicit ``implementation=`` ignores it.
    yields_to: for an ``applies`` that is a speed cut-over, the kernel it
      was measured against: below the cut-over the kernel still runs calls
      that one cannot (blockwise's cut-over is against ``jax_nn``; a
      score_mod below it would otherwise reach the float32, materialised
      ``reference``).
    automatic: False for kernels that only run when named (``ring`` needs a
      device mesh with a sequence axis, which a call cannot infer).
    per_device: a ``pallas_call`` inside: GSPMD cannot partition it, so
      under a mesh with a ``data`` axis dispatch runs it per device
      (``shard_map`` over the batch).
    semantics: ``SOFTMAX`` for exact softmax attention, else the name of the
      function it computes instead (e.g. ``"linear_elu"``). Only softmax
      kernels take part in automatic dispatch, so a model never changes
      function by changing platform.
    weights: for non-softmax kernels, ``fn(query, key, bias, mask, *,
      is_causal, ...) -> [batch..., heads, q_length, kv_length]``, the
      weights it gives (what pictures show).
    limit: optional ``fn(platform, AttentionShape, dtype, features, *,
      window, options, score_mod) -> reason or None``: a call the kernel
      cannot run well on that platform though it has the features (pallas's
      whole-sequence blocks over a TPU core's VMEM; a window cuDNN takes
      only in part). Automatic dispatch skips the kernel with the reason;
      naming it does not.
    refuses: optional ``fn(AttentionShape, mask_mod, score_mod) -> reason or
      None`` (either mod may be None), for a feature the kernel has only in
      some forms (splash takes a static mask_mod, not one that reads traced
      arrays; pallas no mod that gathers per (query, key) pair): automatic
      dispatch skips the kernel with that reason, and naming it raises it.
  """
  name: str
  fn: Callable
  features: FrozenSet[str]
  platforms: Tuple[str, ...] = PLATFORMS
  dtypes: Tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
  description: str = ""
  applies: Optional[Callable[[checks.AttentionShape], bool]] = None
  yields_to: Optional[str] = None
  automatic: bool = True
  per_device: bool = False
  semantics: str = SOFTMAX
  weights: Optional[Callable] = None
  refuses: Optional[Callable] = None
  limit: Optional[Callable] = None

  def supports(self, feature: str) -> bool:
    return feature in self.features

  def takes(self, option: str) -> bool:
    """Whether ``fn`` has a keyword parameter ``option``."""
    return option in inspect.signature(self.fn).parameters


_REGISTRY: Dict[str, KernelSpec] = {}
_PREFERENCE: Dict[str, List[str]] = {p: [] for p in PLATFORMS}


def register(spec: KernelSpec) -> None:
  """Adds (or replaces) a kernel. It joins no platform's automatic order
  until ``set_preference`` names it."""
  unknown = set(spec.features) - set(FEATURES)
  if unknown:
    raise ValueError(f"kernel {spec.name!r} declares unknown features {sorted(unknown)}")
  if spec.semantics != SOFTMAX and (spec.weights is None or spec.automatic):
    raise ValueError(f"kernel {spec.name!r} computes {spec.semantics!r}, not softmax "
                     f"attention: it needs weights= (for pictures) and automatic=False")
  _REGISTRY[spec.name] = spec


def set_preference(platform: str, order: List[str]) -> None:
  """The automatic dispatch order on ``platform``: first that can run wins."""
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; platforms: {', '.join(PLATFORMS)}")
  for name in order:
    spec = get(name)
    if platform not in spec.platforms:
      raise ValueError(f"kernel {name!r} does not run on {platform!r}")
    if spec.semantics != SOFTMAX:
      raise ValueError(f"kernel {name!r} computes {spec.semantics!r}, not softmax "
                       f"attention; automatic dispatch orders softmax kernels only")
  _PREFERENCE[platform] = list(order)


def names() -> List[str]:
  """Registered kernel names, sorted."""
  return sorted(_REGISTRY)


def get(name: str) -> KernelSpec:
  """The spec of kernel ``name``; ValueError listing the known ones."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"unknown attention kernel {name!r}; known kernels: {', '.join(names())}"
    ) from None


def capabilities(name: str) -> Dict[str, object]:
  """Declared capabilities of a kernel, as plain data."""
  spec = get(name)
  caps: Dict[str, object] = {f: f in spec.features for f in FEATURES}
  caps["platforms"] = spec.platforms
  caps["dtypes"] = spec.dtypes
  return caps


def preference(platform: str) -> List[str]:
  """The automatic dispatch order on ``platform``."""
  return list(_PREFERENCE[platform])


# jax.nn's names for implementations, and ours for them.
JAX_IMPLEMENTATIONS = {"xla": "jax_nn", "cudnn": "cudnn"}


def parse_choice(choice):
  """A kernel choice (``implementation=``, ``config.model.attention.kernel``) as data.

  Accepts None (automatic everywhere), a kernel name (that kernel on every
  platform; jax.nn's ``"xla"`` / ``"cudnn"`` included), or a per-platform pin
  such as ``"cpu=blockwise"`` or ``"cpu=reference,gpu=jax_nn"`` (also as a
  dict): the named platforms use their kernel, the others choose
  automatically. A per-platform pin lets an experiment keep a kernel tuned
  for one machine without forcing it onto accelerators.

  Returns:
    None, a registered kernel name, or ``{platform: kernel name}``.
  """
  if choice is None:
    return None
  if isinstance(choice, str) and "=" not in choice:
    name = JAX_IMPLEMENTATIONS.get(choice.strip(), choice.strip())
    get(name)
    return name
  if isinstance(choice, str):
    pairs = []
    for part in choice.split(","):
      platform, sep, name = part.partition("=")
      if not sep or not platform.strip() or not name.strip():
        raise ValueError(f"kernel choice {choice!r}: write a kernel name or "
                         f"platform=kernel pairs such as 'cpu=blockwise,tpu=splash'")
      pairs.append((platform.strip(), name.strip()))
  else:
    pairs = list(dict(choice).items())
  pins = {}
  for platform, name in pairs:
    if platform not in PLATFORMS:
      raise ValueError(f"kernel choice {choice!r}: unknown platform {platform!r}; "
                       f"platforms: {', '.join(PLATFORMS)}")
    if platform in pins:
      raise ValueError(f"kernel choice {choice!r}: platform {platform!r} named twice")
    name = JAX_IMPLEMENTATIONS.get(name, name)
    if platform not in get(name).platforms:
      raise ValueError(f"kernel choice {choice!r}: kernel {name!r} does not run on "
                       f"{platform!r} (platforms: {', '.join(get(name).platforms)})")
    pins[platform] = name
  semantics = {get(name).semantics for name in pins.values()}
  if len(pins) < len(PLATFORMS):
    semantics.add(SOFTMAX)           # the unpinned platforms choose automatically
  if len(semantics) > 1:
    raise ValueError(f"kernel choice {choice!r} mixes attention functions "
                     f"({', '.join(sorted(semantics))}): a model would compute a different "
                     f"function on each platform; name one kernel for all")
  return pins


def semantics_of(choice) -> str:
  """The attention function a kernel choice computes (``SOFTMAX`` unless a
  non-softmax kernel is named)."""
  parsed = parse_choice(choice)
  if parsed is None:
    return SOFTMAX
  if isinstance(parsed, str):
    return get(parsed).semantics
  return get(next(iter(parsed.values()))).semantics
