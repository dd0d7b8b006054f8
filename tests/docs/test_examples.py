"""Runs every ```python block of the README and of docs/*.md, in order, one namespace per file."""

import re
from pathlib import Path

import pytest

from torchvision_support import require_torchvision

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# A page whose examples need optional packages says so: <!-- requires: lightning transformers -->
REQUIRES = re.compile(r"<!-- requires: ([\w\s-]+?)(?: \(.*?\))? -->")


def _requires(path: Path) -> list[str]:
    return [module for match in REQUIRES.finditer(path.read_text()) for module in match.group(1).split()]


def _page(path: Path) -> object:
    # pages that need torchvision run in make test-vision (tests marked torchvision)
    return pytest.param(path, marks=[pytest.mark.torchvision] if "torchvision" in _requires(path) else [])


PAGES = [_page(f) for f in FILES if BLOCK.search(f.read_text())]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_examples_run(path, tmp_path, monkeypatch):
    for module in _requires(path):
        if module == "torchvision":  # a build for another torch raises RuntimeError, not ImportError
            require_torchvision()
        else:
            pytest.importorskip(module, reason=f"{path.name}'s examples need {module}")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(BLOCK.findall(path.read_text())):
        exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_names_the_torchvision_pair_that_make_test_vision_tests():
    script = (ROOT / "scripts" / "test_vision.sh").read_text()
    torch_version, vision_version = re.search(
        r'VISION_TORCH_SPEC:-"torch==([\d.]+) torchvision==([\d.]+)"', script
    ).groups()
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"torch {torch_version} and torchvision {vision_version}" in readme
    assert "make test-vision" in readme
    assert "test-vision:" in (ROOT / "Makefile").read_text() and "-m torchvision" in script
