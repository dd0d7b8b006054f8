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
    ([{'acc': 0.5, 'step': 0}], ['line 2: invalid JSON (Unterminated string starting at, torn write?)'])
    >>> is_done(run), mark_done(run), is_done(run)
    (False, None, True)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DONE",
    "RESULTS",
    "append_json_line",
    "atomic_torch_save",
    "atomic_write_text",
    "is_done",
    "iter_json_lines",
    "mark_done",
    "read_json_lines",
]

#: the file that marks a finished run
DONE = "done"
#: the whole-line JSON results of a run
RESULTS = "results.jsonl"


def append_json_line(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Appends ``record`` as one JSON line (sorted keys) in a single write, flushed to disk: a
    kill leaves at most a torn last line, which :func:`read_json_lines` reports instead of parsing."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, parsed value, None)`` for every non-blank line of a results file, or
    ``(line number, None, problem)`` for a line that does not parse (``not UTF-8``, or ``invalid
    JSON (..., torn write?)``: the last line of a killed run)."""
    with open(path, "rb") as f:
        data = f.read()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError:
            yield number, None, "not UTF-8"
        except json.JSONDecodeError as error:
            yield number, None, f"invalid JSON ({error.msg}, torn write?)"


def read_json_lines(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON objects of a results file, and one ``"line N: problem"`` for every line that is
    not one (a torn last line of a killed run, a value that is not an object)."""
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, value, problem in iter_json_lines(path):
        if problem is None and not isinstance(value, dict):
            problem = f"not a JSON object ({type(value).__name__})"
        if problem is not None:
            problems.append(f"line {number}: {problem}")
        else:
            records.append(value)
    return records, problems


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
