"""Reading files that torchsage did not necessarily write, without running code from them.

A pickle can run arbitrary code while it is loaded, and torchsage is handed files from elsewhere
(a colleague's ``model.pt``, a run directory copied from a cluster, pretrained weights, cached
data). Every torch file therefore goes through :func:`safe_torch_load` (``weights_only=True``:
tensors, containers and plain Python values only) and every NumPy file through
:func:`safe_numpy_load` (``allow_pickle=False``); JSON files through :func:`read_json_file`.

Each one turns every way a file can be bad into one exception with one line of text naming the
file, what it was meant to be and what is wrong: :class:`UnreadableFileError` (a ``ValueError``,
so the command line reports it as bad input) or ``FileNotFoundError``. Nothing is written.

Example:
    >>> import tempfile, pathlib, torch
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> torch.save({"w": torch.ones(2)}, folder / "weights.pt")
    >>> safe_torch_load(folder / "weights.pt", what="pretrained weights")
    {'w': tensor([1., 1.])}
    >>> _ = (folder / "broken.pt").write_bytes(b"not a checkpoint")
    >>> safe_torch_load(folder / "broken.pt", what="checkpoint")
    Traceback (most recent call last):
    ...
    torchsage.files.UnreadableFileError: checkpoint .../broken.pt is not a readable torch file: not ...
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["UnreadableFileError", "load_weights", "read_json_file", "safe_numpy_load", "safe_torch_load"]

# torch's weights-only unpickler names the refused global as "GLOBAL module.name"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UnreadableFileError(ValueError):
    """A file that exists but cannot be used: truncated, corrupt, of another format, or holding
    objects whose loading could run code. The message is one line naming the file."""

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)


def _first_line(error: BaseException, limit: int = 160) -> str:
    """The first sentence of an error's message (torch's run to several lines), or its type."""
    text = str(error).strip().splitlines()[0].strip() if str(error).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(error).__name__


def _existing_file(path: str | os.PathLike, what: str, hint: str) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"{what} {file} does not exist{hint}")
    if not file.is_file():
        raise UnreadableFileError(f"{what} {file} is not a file{hint}", file)
    return file


def _damaged(what: str, file: Path, kind: str, error: BaseException, hint: str) -> UnreadableFileError:
    message = (
        f"{what} {file} is not a readable {kind} file, truncated or corrupt ({_first_line(error)}){hint}"
    )
    return UnreadableFileError(message, file)


def _starts_with(file: Path, prefix: bytes) -> bool:
    with open(file, "rb") as f:
        return f.read(len(prefix)) == prefix


def safe_torch_load(path: str | os.PathLike, *, what: str = "torch file", hint: str = "") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with one-line errors.

    Args:
        path: the file.
        what: what the file is meant to be, for the messages ("pretrained weights").
        hint: appended to every message, say ``" (train with --save-model)"``.

    Returns:
        The loaded object: tensors (on the CPU), dicts, lists, tuples and plain Python values.

    Raises:
        FileNotFoundError: no such file.
        UnreadableFileError: a directory, an empty, truncated or corrupt file, a file of another
            format, or one that holds other Python objects (refused without creating them: that
            is where a crafted file would run its code).

    Example:
        >>> import tempfile, pathlib, torch
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "state.pt"
        >>> torch.save({"step": 3, "m": torch.zeros(1)}, path)
        >>> safe_torch_load(path, what="optimizer state")["step"]
        3
    """
    import torch

    file = _existing_file(path, what, hint)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _GLOBAL.search(str(error))
        if found:
            raise UnreadableFileError(
                f"{what} {file} holds a Python object ({found.group(1)}) besides tensors and plain values: "
                f"refused, since loading it could run code from the file{hint}",
                file,
            ) from None
        raise UnreadableFileError(
            f"{what} {file} is not a readable torch file: not written by torch.save, or corrupt{hint}", file
        ) from None
    except EOFError:
        raise UnreadableFileError(f"{what} {file} is empty or truncated{hint}", file) from None
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile, UnicodeDecodeError, struct.error) as error:
        raise _damaged(what, file, "torch", error, hint) from None


def safe_numpy_load(path: str | os.PathLike, *, what: str = "array file", hint: str = "") -> Any:
    """``numpy.load(path, allow_pickle=False)``, read whole, with one-line errors.

    A ``.npy`` file gives its array; a ``.npz`` archive a dict of its arrays, every member read
    here (so a damaged member is reported now, not at first use).

    Raises:
        FileNotFoundError: no such file.
        UnreadableFileError: a directory, an empty, truncated or corrupt file, another format, or
            object arrays (pickles: refused, since loading them could run code).

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "cache.npz"
        >>> np.savez(path, x=np.zeros((2, 3)), y=np.arange(2))
        >>> {k: v.shape for k, v in safe_numpy_load(path, what="data cache").items()}
        {'x': (2, 3), 'y': (2,)}
    """
    import numpy as np

    file = _existing_file(path, what, hint)
    try:
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {name: loaded[name] for name in loaded.files}
        return loaded
    except ValueError as error:
        text = str(error)
        # numpy takes any file without its magic number for a pickle; real pickles start with 0x80
        if "Object arrays" in text or ("pickle" in text and _starts_with(file, b"\x80")):
            raise UnreadableFileError(
                f"{what} {file} holds pickled Python objects: refused, since loading them could run code "
                f"from the file{hint}",
                file,
            ) from None
        if "pickle" in text:
            message = f"{what} {file} is not a NumPy file (.npy or .npz){hint}"
            raise UnreadableFileError(message, file) from None
        raise _damaged(what, file, "NumPy", error, hint) from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise _damaged(what, file, "NumPy", error, hint) from None


def read_json_file(path: str | os.PathLike, *, what: str = "JSON file", hint: str = "") -> Any:
    """The parsed contents of a JSON file, with one-line errors (never ``eval``).

    Raises:
        FileNotFoundError: no such file.
        UnreadableFileError: a directory, a file that is not UTF-8 or not one JSON value.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "theory.json"
        >>> _ = path.write_text('{"trace": 1.5}')
        >>> read_json_file(path, what="theory terms")
        {'trace': 1.5}
    """
    file = _existing_file(path, what, hint)
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UnreadableFileError(f"{what} {file} is not UTF-8 text{hint}", file) from None
    except json.JSONDecodeError as error:
        where = f"{error.msg} at line {error.lineno}"
        message = f"{what} {file} is not valid JSON ({where}), truncated or corrupt{hint}"
        raise UnreadableFileError(message, file) from None


def load_weights(module: Any, state: Any, *, what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` after checking that ``state`` fits: every key
    of the module present with its shape, nothing else. Otherwise one ``ValueError`` line naming a
    few missing, unexpected and mis-shaped keys, with ``module`` left as it was.

    Example:
        >>> import torch
        >>> load_weights(torch.nn.Linear(2, 3), torch.nn.Linear(2, 4).state_dict(), what="weights in w.pt")
        Traceback (most recent call last):
        ...
        ValueError: weights in w.pt do not fit the Linear (wrong shape: bias, weight)
    """
    import torch

    if not isinstance(state, dict):
        raise ValueError(f"{what} are a {type(state).__name__}, not a state_dict (a dict of tensors)")
    expected = module.state_dict()
    keys = {str(k) for k in state}
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    mis_shaped = sorted(
        k
        for k in set(expected) & keys
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if names:
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{what} do not fit the {type(module).__name__} ({'; '.join(problems)})")
    module.load_state_dict(state, strict=True)
