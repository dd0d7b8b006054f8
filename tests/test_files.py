"""Reading files without running code from them (``torchsage.files``).

Two guarantees, each checked so that the check can fail:
- the source holds no unsafe load (the scanner is first shown to catch every pattern it looks for);
- a crafted file whose unpickling would create a file is refused by every public loader with one
  line, creating nothing (the same file, loaded the unsafe way here, is first shown to create it).
"""

from __future__ import annotations

import ast
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from torchsage.files import UnreadableFileError, read_json_file, safe_numpy_load, safe_torch_load

SRC = Path(__file__).resolve().parents[1] / "src" / "torchsage"

# modules whose load functions unpickle (or otherwise run) what they read
PICKLERS = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
    "jsonpickle",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_literal(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Every place in ``source`` that could load a file by running code from it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module:
            top, names = node.module.split(".")[0], {a.name for a in node.names}
            if top in PICKLERS and names & {"load", "loads", "Unpickler", "open"}:
                found.append(f"{where}: from {node.module} import {', '.join(sorted(names))}")
            if top in ("torch", "numpy") and "load" in names:
                found.append(f"{where}: from {node.module} import load (call it qualified, checked here)")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = name.split(".")
        keywords = {k.arg: k.value for k in node.keywords}
        if _is_literal(keywords.get("weights_only"), False) or _is_literal(
            keywords.get("allow_pickle"), True
        ):
            found.append(f"{where}: {name}(...) asks for an unsafe load")
        if name in ("eval", "exec"):
            found.append(f"{where}: {name}()")
        elif parts[0] in PICKLERS and parts[-1] in ("load", "loads", "Unpickler", "open", "decode"):
            found.append(f"{where}: {name}()")
        elif name == "torch.load" and not _is_literal(keywords.get("weights_only"), True):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name in ("np.load", "numpy.load") and not _is_literal(keywords.get("allow_pickle"), False):
            found.append(f"{where}: {name} without allow_pickle=False")
        elif name.endswith(("jit.load", "read_pickle", "yaml.load", "yaml.unsafe_load", "add_safe_globals")):
            found.append(f"{where}: {name}()")
    return found


def test_the_scanner_catches_every_unsafe_pattern():
    bad = [
        "torch.load(f)",
        "torch.load(f, weights_only=False)",
        "torch.load(f, map_location='cpu', weights_only=flag)",
        "np.load(f)",
        "numpy.load(f, allow_pickle=True)",
        "pickle.load(f)",
        "pickle.loads(data)",
        "dill.loads(data)",
        "marshal.loads(data)",
        "shelve.open(path)",
        "from pickle import load",
        "from torch import load",
        "eval(text)",
        "exec(text)",
        "yaml.load(text)",
        "pd.read_pickle(path)",
        "torch.jit.load(path)",
        "torch.serialization.add_safe_globals([Thing])",
        "lightning_load(path, weights_only=False)",
    ]
    for line in bad:
        assert len(unsafe_loads(line)) >= 1, line
    good = [
        "torch.load(f, map_location='cpu', weights_only=True)",
        "np.load(f, allow_pickle=False)",
        "import pickle",
        "error = pickle.UnpicklingError",
        "model.eval()",
        "json.loads(text)",
        "re.compile(text)",
    ]
    for line in good:
        assert unsafe_loads(line) == [], line


def test_the_package_and_benchmark_sources_hold_no_unsafe_load():
    files = sorted([*SRC.rglob("*.py"), *(SRC.parents[1] / "benchmarks").rglob("*.py")])
    assert len(files) > 50  # the scan really reads the package
    found = [
        hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(SRC.parents[1])))
    ]
    assert found == []


# -- a crafted file ----------------------------------------------------------------------------


class _CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root``: size, modification time and content hash."""
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_crafted(folder: Path, marker: Path) -> Path:
    """Crafted files in every format torchsage reads, whose unpickling creates ``marker``."""
    folder.mkdir()
    payload = {"benchmark": "multidigits", "model": {"w": torch.zeros(2)}, "extra": _CreatesFile(marker)}
    torch.save(payload, folder / "model.pt")
    torch.save(payload, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    np.save(folder / "array.npy", np.array([_CreatesFile(marker)], dtype=object), allow_pickle=True)
    np.savez(folder / "cache.npz", x=np.array([_CreatesFile(marker)], dtype=object))
    return folder


def truncated(good: Path, target: Path) -> Path:
    data = good.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


@pytest.fixture
def crafted(tmp_path):
    """``(folder, marker)``: the crafted files, and the file their unpickling would create."""
    marker = tmp_path / "created_by_unpickling"
    return write_crafted(tmp_path / "files", marker), marker


UNSAFE = {  # how each file would be loaded without the safeguards, returning the opened file
    "model.pt": lambda p: torch.load(p, weights_only=False)["extra"],
    "legacy.pt": lambda p: torch.load(p, weights_only=False)["extra"],
    "array.npy": lambda p: np.load(p, allow_pickle=True)[0],
    "cache.npz": lambda p: np.load(p, allow_pickle=True)["x"][0],
}


@pytest.mark.parametrize("name", sorted(UNSAFE))
def test_the_crafted_files_do_create_a_file_when_loaded_unsafely(name, tmp_path):
    marker = tmp_path / "created"
    folder = write_crafted(tmp_path / "files", marker)
    UNSAFE[name](folder / name).close()
    assert marker.exists()


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and text.strip() == text and text, repr(text)
    return text


def _mtl_dir(folder: Path) -> Path:
    run = folder.parent / "mtl_run"
    run.mkdir()
    os.replace(folder / "model.pt", run / "model.pt")
    return run


def _theory(path: Path) -> None:
    from torchsage.study.theory import measure_run

    run = path.parent / "dg_run"
    run.mkdir()
    os.replace(path, run / "model.pt")
    (run / "done").write_text("done\n")
    measure_run(run)


def _nyuv2(path: Path) -> None:
    from torchsage.mtl.data import NYUv2, write_fake_nyuv2

    root = write_fake_nyuv2(path.parent / "nyuv2", n=1, size=(8, 8))
    os.replace(path, root / "train" / "image" / "0.npy")
    NYUv2(root, "train")[0]


def _backbone(path: Path) -> None:
    from torchsage.dg.resnet import load_backbone_weights

    load_backbone_weights(torch.nn.Linear(2, 2), path)


LOADERS = {
    "safe_torch_load": ("model.pt", lambda p: safe_torch_load(p)),
    "safe_torch_load (legacy format)": ("legacy.pt", lambda p: safe_torch_load(p)),
    "safe_numpy_load (.npy)": ("array.npy", lambda p: safe_numpy_load(p)),
    "safe_numpy_load (.npz)": ("cache.npz", lambda p: safe_numpy_load(p)),
    "mtl load_for_diagnostics": (
        "model.pt",
        lambda p: __import__("torchsage.mtl.checkpoint").mtl.checkpoint.load_for_diagnostics(
            _mtl_dir(p.parent)
        ),
    ),
    "dg load_backbone_weights": ("model.pt", _backbone),
    "study measure_run": ("model.pt", _theory),
    "NYUv2 arrays": ("array.npy", _nyuv2),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_loader_refuses_the_crafted_file_with_one_line_creating_nothing(loader, crafted, tmp_path):
    folder, marker = crafted
    name, load = LOADERS[loader]
    with pytest.raises(UnreadableFileError) as caught:
        load(folder / name)
    text = _one_line(caught.value)
    assert "refused, since loading" in text and "could run code" in text
    assert name in text or "0.npy" in text  # names the file
    assert not marker.exists()


def test_the_environment_cannot_switch_the_safe_load_off(crafted, monkeypatch):
    # torch lets this variable turn weights_only off, but only where a call leaves it unset
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    folder, marker = crafted
    with pytest.raises(UnreadableFileError, match="refused"):
        safe_torch_load(folder / "model.pt")
    assert not marker.exists()


def test_the_command_line_refuses_the_crafted_checkpoint_with_one_line(crafted, capsys):
    from torchsage.cli import main

    folder, marker = crafted
    before = snapshot(folder)
    assert main(["diagnose", str(folder / "model.pt"), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert "model.pt holds a Python object (io.open)" in err and "refused" in err
    assert not marker.exists() and snapshot(folder) == before


# -- the helpers on damaged files ----------------------------------------------------------------


def test_safe_torch_load_names_what_is_wrong(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(100.0)}, good)
    data = good.read_bytes()
    cases = {
        "missing.pt": (None, FileNotFoundError, "does not exist (hint)"),
        "empty.pt": (b"", UnreadableFileError, "is empty or truncated (hint)"),
        "truncated.pt": (data[: len(data) // 2], UnreadableFileError, "truncated or corrupt"),
        "text.pt": (b'{"w": 1}\n', UnreadableFileError, "not written by torch.save, or corrupt"),
    }
    for name, (content, kind, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(kind) as caught:
            safe_torch_load(tmp_path / name, what="weights", hint=" (hint)")
        text = _one_line(caught.value)
        assert text.startswith(f"weights {tmp_path / name} ") and message in text, text
    with pytest.raises(UnreadableFileError, match="is not a file"):
        safe_torch_load(tmp_path, what="weights")
    assert torch.equal(safe_torch_load(good)["w"], torch.arange(100.0))


def test_safe_numpy_load_names_what_is_wrong(tmp_path):
    np.save(tmp_path / "good.npy", np.arange(1000.0))
    data = (tmp_path / "good.npy").read_bytes()
    np.savez(tmp_path / "good.npz", x=np.arange(1000.0))
    zipped = (tmp_path / "good.npz").read_bytes()
    cases = {
        "empty.npy": (b"", "truncated or corrupt"),
        "header.npy": (data[:20], "truncated or corrupt"),
        "truncated.npy": (data[:500], "truncated or corrupt"),
        "truncated.npz": (zipped[: len(zipped) // 2], "truncated or corrupt"),
        "text.npy": (b"hello", "is not a NumPy file (.npy or .npz)"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UnreadableFileError) as caught:
            safe_numpy_load(tmp_path / name, what="cache")
        text = _one_line(caught.value)
        assert text.startswith(f"cache {tmp_path / name} ") and message in text, text
    assert np.array_equal(safe_numpy_load(tmp_path / "good.npy"), np.arange(1000.0))
    assert np.array_equal(safe_numpy_load(tmp_path / "good.npz")["x"], np.arange(1000.0))


def test_read_json_file_names_what_is_wrong(tmp_path):
    for name, content, message in (
        ("torn.json", b'{"a": 1, "b', "is not valid JSON (Unterminated string"),
        ("latin1.json", '{"a": "\xe9"}'.encode("latin-1"), "is not UTF-8 text"),
        ("empty.json", b"", "is not valid JSON (Expecting value at line 1)"),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UnreadableFileError) as caught:
            read_json_file(tmp_path / name, what="terms")
        assert message in _one_line(caught.value)
    assert isinstance(UnreadableFileError("x", "p"), ValueError)  # the command line's bad input
