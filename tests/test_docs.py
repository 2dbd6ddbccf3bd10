"""The code in docs/kernels.md's guides runs as written."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "kernels.md"


def _python_blocks(section: str):
  text = DOC.read_text()
  start = text.index(f"## {section}")
  end = text.find("\n## ", start + 1)
  body = text[start:end if end != -1 else len(text)]
  return re.findall(r"```python\n(.*?)```", body, re.S)


@pytest.mark.parametrize("section", ["Writing a score_mod", "Adding a kernel"])
def test_guide_code_runs(section):
  from attention_lab.kernels import mods
  from attention_lab.kernels import registry
  blocks = _python_blocks(section)
  assert blocks, f"no python block under {section!r}"
  saved_kernels, saved_mods = dict(registry._REGISTRY), dict(mods._MODS)
  try:
    for block in blocks:
      exec(compile(block, f"{DOC.name}: {section}", "exec"), {})
  finally:                 # leave the registries as the rest of the suite knows them
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved_kernels)
    mods._MODS.clear()
    mods._MODS.update(saved_mods)
