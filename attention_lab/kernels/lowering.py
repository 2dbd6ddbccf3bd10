"""Cross-lowering: compile a function for TPU or GPU from a machine without one.

``jax.export`` lowers for any platform JAX knows. Pallas reads the TPU
generation from the abstract mesh's device (``AbstractDevice``), so lowering
under ``use_abstract_mesh`` runs Mosaic's TPU checks (8 x 128 tiles, SMEM for
scalars, ...) as a real TPU would at its first step. Tests use this to assert
that the fused kernel, not a fallback, is in the module.

Usage::

    text = lower_for(jax.jit(step), args, "tpu")       # StableHLO text
    assert "tpu_custom_call" in custom_calls(text)
"""

from __future__ import annotations

import re
from typing import Dict, List, Sequence, Set

import jax
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

# Colab's TPU runtimes today (v5e, and v6e on paid tiers) and an older pod chip.
TPU_KINDS = ("TPU v5 lite", "TPU v6 lite", "TPU v4")
TRITON_CALL = "__gpu$xla.gpu.triton"
# The fused kernel's custom call per platform, and the three Pallas kernels
# of a training step (forward, dK/dV, dQ).
FUSED_CALLS = {"tpu": "tpu_custom_call", "cuda": TRITON_CALL}
FLASH_KERNELS = frozenset({"attention_lab_flash_forward", "attention_lab_flash_dkdv",
                           "attention_lab_flash_dq"})


def tpu_mesh(device_kind: str = TPU_KINDS[0], devices: int = 1,
             axis_names: Sequence[str] = ("data",)) -> AbstractMesh:
  """An abstract mesh of ``devices`` TPU chips of ``device_kind``."""
  device = AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
  sizes = (devices,) + (1,) * (len(axis_names) - 1)
  return AbstractMesh(sizes, tuple(axis_names), (AxisType.Explicit,) * len(axis_names),
                      abstract_device=device)


def lower_for(fn, args, platform: str, device_kind: str = TPU_KINDS[0]) -> str:
  """StableHLO text of ``jax.jit(fn)`` exported for ``platform`` ("tpu", "cuda").

  ``args`` may be arrays or ``jax.ShapeDtypeStruct``s (pytrees allowed).
  Triton calls carry no serialisation guarantee; they are allowed here since
  the module is only inspected, never stored.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  if platform == "tpu":
    with jax.sharding.use_abstract_mesh(tpu_mesh(device_kind)):
      return export.export(jitted, platforms=["tpu"])(*args).mlir_module()
  checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  return export.export(jitted, platforms=[platform], disabled_checks=checks)(*args).mlir_module()


def custom_calls(text: str) -> Set[str]:
  """Custom-call targets in a lowered module (``tpu_custom_call``, Triton, cuDNN...)."""
  return set(re.findall(r"custom_call @([\w$.]+)", text))


def called_kernels(text: str) -> List[str]:
  """The Mosaic and Triton kernels a lowered module calls, by the name each
  custom call carries (``kernel_name`` on TPU, ``name`` for Triton), one
  entry per call. Only the calls are read: the module's source locations
  name functions too, and would match a test called ``..._splash_...``."""
  names = []
  for line in text.splitlines():
    if "custom_call @tpu_custom_call" in line:
      names += re.findall(r'kernel_name = "([^"]+)"', line)
    elif f"custom_call @{TRITON_CALL}" in line:
      names += re.findall(r'\bname = "([^"]+)"', line)
  return names


def kernel_results(text: str, name: str) -> List[List[str]]:
  """What each call of kernel ``name`` (``called_kernels``) writes: its
  result types, e.g. ``["2x4x256x128xf32", "2x4x256x256xf32"]``."""
  results = []
  for line in text.splitlines():
    if "custom_call @" in line and name in called_kernels(line):
      # The call's signature ends the line: `: (operands) -> (results)`.
      results.append(re.findall(r"tensor<([^>]+)>", line.rpartition("->")[2]))
  return results


def kernel_names(text: str) -> Set[str]:
  """The kernels a lowered module calls (``called_kernels``), with
  ``"splash"`` added when any of them is one of splash attention's
  (``splash_mha_fwd...``, ``splash_mqa_dkv...``)."""
  found = set(called_kernels(text))
  return found | ({"splash"} if any(n.startswith("splash_") for n in found) else set())


def fused_kernels(fn, args) -> Dict[str, Set[str]]:
  """``{"tpu": names, "cuda": names}``: the Pallas kernels in ``fn`` lowered
  for each platform, empty where the platform's fused call is missing."""
  found = {}
  for platform, call in FUSED_CALLS.items():
    text = lower_for(fn, args, platform)
    found[platform] = kernel_names(text) if call in custom_calls(text) else set()
  return found
