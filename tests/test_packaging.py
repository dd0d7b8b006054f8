"""The package as a user gets it: a wheel built from the source tree, installed into a fresh virtual
environment (no editable install, no network), runs the README quickstart; the metadata files
agree with each other."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import torchsage

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    return re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment holding only the torchsage wheel; torch, numpy and tqdm are
    reused from the running environment through a .pth file (they are not what is tested)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(dist), str(source)])  # fmt: skip
    (wheel,) = dist.glob("torchsage-*.whl")
    env = tmp / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)])
    python = env / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    _run([*pip, "install", "--no-index", "--no-deps", str(wheel)])
    # Only after the install: pip must not see the development install through this path.
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib.stdout.strip(), "outer.pth").write_text("\n".join(sorted(outer)) + "\n")
    return env


def _clean_env() -> dict[str, str]:
    """The environment without the source tree on the path (PYTHONPATH=src in development)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_wheel_runs_the_readme_quickstart(installed, tmp_path):
    python = str(installed / "bin" / "python")
    where = _run(
        [python, "-c", "import torchsage; print(torchsage.__file__)"], cwd=tmp_path, env=_clean_env()
    )
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout
    out = _run([python, "-c", _quickstart()], cwd=tmp_path, env=_clean_env())
    assert re.fullmatch(r"loss \d+\.\d{3}  disagreement \d+\.\d{3}  noise std \d+\.\d{5}\n", out.stdout), (
        out.stdout
    )


def test_wheel_installs_the_command(installed, tmp_path):
    command = str(installed / "bin" / "torchsage")
    assert "usage: torchsage" in _run([command, "--help"], cwd=tmp_path, env=_clean_env()).stdout
    version = _run([command, "--version"], cwd=tmp_path, env=_clean_env()).stdout
    assert version.strip() == f"torchsage {torchsage.__version__}"


def test_wheel_contents(installed):
    (wheel,) = installed.parent.glob("dist/torchsage-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "torchsage/py.typed" in names and "torchsage/groups.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"torchsage-{torchsage.__version__}.dist-info/METADATA").decode()
    assert "Requires-Python: >=3.11" in metadata and "License-Expression: MIT" in metadata


def test_versions_agree():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'\nversion = "{torchsage.__version__}"\n' in pyproject
    assert f"\nversion: {torchsage.__version__}\n" in (ROOT / "CITATION.cff").read_text()
    assert f"## {torchsage.__version__}" in (ROOT / "CHANGELOG.md").read_text()
