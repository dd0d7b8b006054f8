"""Run records: whole-line JSON results, the ``done`` file, atomic writes.

A run directory holds ``results.jsonl`` (one JSON object per line, appended in one flushed write
each, so a killed run leaves at most a torn last line), ``done`` once the run finished, and
optionally ``model.pt`` (written to a temporary name, then renamed: never half a file).

Example:
    >>> import tempfile, pathlib
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> append_json_line(run / "results.jsonl", {"step": 0, "acc": 0.5})
    >>> with open(run / "results.jsonl", "a") as f:
    ...     _ = f.write('{"step": 1, "ac')  # a run killed mid-write
    >>> read_json_lines(run / "results.jsonl")
    ([{'acc': 0.5, 'step': 0}], 1)
    >>> is_done(run), mark_done(run), is_done(run)
    (False, None, True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "DONE",
    "RESULTS",
    "append_json_line",
    "atomic_torch_save",
    "atomic_write_text",
    "is_done",
    "mark_done",
    "read_json_lines",
]

#: the file that marks a finished run
DONE = "done"
#: the whole-line JSON results of a run
RESULTS = "results.jsonl"


def append_json_line(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Appends ``record`` as one JSON line (sorted keys) in a single write, flushed to disk: a
    kill leaves at most a torn last line, which :func:`read_json_lines` counts instead of parsing."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_json_lines(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a results file and the number of lines that did not parse (a torn last
    line of a killed run; blank lines are ignored)."""
    records: list[dict[str, Any]] = []
    torn = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(value, dict):
                records.append(value)
            else:
                torn += 1
    return records, torn


def is_done(run_dir: str | os.PathLike) -> bool:
    """Whether the run directory holds a ``done`` file."""
    return (Path(run_dir) / DONE).exists()


def mark_done(run_dir: str | os.PathLike) -> None:
    """Writes the ``done`` file: the last write of a finished run."""
    (Path(run_dir) / DONE).write_text("done\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed over ``path``."""
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
