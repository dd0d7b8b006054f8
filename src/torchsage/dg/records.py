"""Reading a sweep directory: every run's checkpoint records, the unfinished runs, the lines that
cannot be used (torn writes and other damage, named with their line number), and the check that
the runs of one (data set, algorithm) share their settings (:func:`check_settings`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchsage.harness.records import iter_json_lines

__all__ = ["NOT_SETTINGS", "Records", "check_settings", "load_records"]

Record = dict[str, Any]


@dataclass
class Records:
    """What :func:`load_records` found under a sweep directory.

    Attributes:
        records: the parsed checkpoint records (one dict per valid line), in run-directory order
            then file order. Iterating, indexing and ``len`` act on this list.
        runs: every run directory found (finished or not).
        unfinished: run directories without a ``done`` file, whether or not their records were
            included (see ``include_unfinished``).
        corrupt: ``(file, problem)`` for every line that could not be used (torn or invalid JSON,
            not an object, missing ``args`` fields) and every unreadable or missing results file.
    """

    records: list[Record] = field(default_factory=list)
    runs: list[Path] = field(default_factory=list)
    unfinished: list[Path] = field(default_factory=list)
    corrupt: list[tuple[Path, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record_problem(obj: Any) -> str | None:
    """Why a parsed line cannot serve as a record, or None when it can."""
    if not isinstance(obj, dict):
        return f"not a JSON object ({type(obj).__name__})"
    if not isinstance(obj.get("step"), int | float) or isinstance(obj.get("step"), bool):
        return "no numeric 'step'"
    args = obj.get("args")
    if not isinstance(args, dict):
        return "no 'args' object"
    for key in ("dataset", "algorithm"):
        if not isinstance(args.get(key), str):
            return f"no string args.{key}"
    test_envs = args.get("test_envs")
    if not isinstance(test_envs, list) or not test_envs or not all(_is_int(i) and i >= 0 for i in test_envs):
        return "args.test_envs is not a non-empty list of environment indices"
    for key in ("hparams_seed", "trial_seed"):
        if not _is_int(args.get(key)):
            return f"no integer args.{key}"
    return None


def _read_results(path: Path) -> tuple[list[Record], list[tuple[Path, str]]]:
    records: list[Record] = []
    corrupt: list[tuple[Path, str]] = []
    try:
        lines = list(iter_json_lines(path))
    except OSError as error:
        return records, [(path, f"unreadable: {error}")]
    for number, obj, problem in lines:
        if problem is not None:
            corrupt.append((path, f"line {number}: {problem}"))
            continue
        problem = _record_problem(obj)
        if problem is not None:
            corrupt.append((path, f"line {number}: {problem}"))
            continue
        records.append(obj)
    return records, corrupt


def _is_run_dir(path: Path) -> bool:
    return (path / "results.jsonl").is_file() or (path / "done").exists()


def load_records(root: str | Path, include_unfinished: bool = False) -> Records:
    """Reads the records of every run under ``root``.

    Run directories are the direct subdirectories of ``root`` holding ``results.jsonl`` or
    ``done``; ``root`` itself counts as the only run when it holds ``results.jsonl``. A run without
    ``done`` is unfinished: it is listed in ``Records.unfinished`` and its records are left out
    unless ``include_unfinished``. Lines that cannot be used are listed in ``Records.corrupt`` (with
    their line number and the reason) and skipped; nothing is raised for bad content.

    Raises:
        ValueError: ``root`` is not an existing directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    if (root / "results.jsonl").is_file():
        run_dirs = [root]
    else:
        run_dirs = sorted(
            p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_run_dir(p)
        )
    out = Records(runs=list(run_dirs))
    for run in run_dirs:
        finished = (run / "done").exists()
        if not finished:
            out.unfinished.append(run)
        results = run / "results.jsonl"
        if not results.is_file():
            if finished:
                out.corrupt.append((results, "missing although the run is marked done"))
            continue
        records, corrupt = _read_results(results)
        out.corrupt.extend(corrupt)
        if finished or include_unfinished:
            out.records.extend(records)
    return out


#: recorded arguments that do not change what a run computes or that a sweep varies by design
#: (the seeds and the held-out environments); every other one must agree within a table
NOT_SETTINGS = frozenset(
    {"seed", "trial_seed", "hparams_seed", "test_envs", "output_dir", "data_dir", "save_model",
     "num_workers", "progress", "device"}
)  # fmt: skip


def check_settings(records: Iterable[Mapping[str, Any]]) -> None:
    """Refuses records of one (data set, algorithm) whose runs differ in anything but the seeds and
    the test environments (steps, hparams overrides, holdout fraction, ...): their accuracies
    would be averaged as if they were one experiment.

    Raises:
        ValueError: naming the data set, algorithm, the differing settings and their values.
    """
    seen: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for record in records:
        args = record.get("args", {})
        values = seen[(str(args.get("dataset")), str(args.get("algorithm")))]
        for key, value in args.items():
            if key not in NOT_SETTINGS:
                values[key].add(json.dumps(value, sort_keys=True))
    for (dataset, algorithm), values in sorted(seen.items()):
        differ = sorted(k for k, v in values.items() if len(v) > 1)
        if differ:
            detail = "; ".join(f"{k}: {', '.join(sorted(values[k]))}" for k in differ)
            raise ValueError(
                f"the runs of {algorithm} on {dataset} differ in {', '.join(differ)} ({detail}): "
                "report each setting's sweep from its own folder"
            )
