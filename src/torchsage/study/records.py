"""The study's results as one small file that travels with the repository.

The run directories (``runs/study``) hold weights and logs and stay out of version control; the
report needs only a few numbers per run. :func:`export` writes them, one JSON line per finished
run, to a file that is committed (``docs/study_records.jsonl``); ``python -m torchsage.study report
--records docs/study_records.jsonl`` renders the same tables and figures from it on a fresh clone.

Line kinds:

* ``{"kind": "dg", ...}``: one per (finished DG run, method it stands for): data set, test
  domain, trial, method, hyperparameters, training-domain validation and test accuracy, run
  directory name; the pretrained regime's (:mod:`torchsage.study.pretrained`) also the test
  domain's ``out`` accuracy, ``oracle_acc``, which the oracle selection reads (lines without it
  load with ``None``); the run's mean ``step_time`` in seconds (lines without it load with nan);
* ``{"kind": "mtl", ...}``: one per finished MultiDigits run (solver, variant, seed, Δm%);
* ``{"kind": "theory", ...}``: the measured terms of one sampled DG run (the content of its
  ``theory.json``), the first study's and the pretrained regime's (its cells tell them apart);
* ``{"kind": "summary", "dg_missing": N, "pt_missing": M}``: the DG jobs of the first study's
  specification not finished, and of the pretrained regime's (files exported before it existed
  lack ``pt_missing``).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from torchsage.study.records import export, load
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = export(Path(d) / "runs", Path(d) / "records.jsonl")  # nothing finished yet
    ...     runs, missing, mtl, theory = load(path)
    >>> (len(runs), missing > 0, mtl, theory)
    (0, True, [], [])
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torchsage.harness.records import atomic_write_text, read_json_lines

__all__ = ["export", "export_pretrained", "load", "load_pretrained"]


def export(root: str | Path, path: str | Path) -> Path:
    """Writes the records of every finished study run under ``root`` to ``path`` (atomically)."""
    from torchsage.study.pretrained_report import load_pt
    from torchsage.study.render import load_results

    runs, missing, mtl, theory = load_results(root)
    pt_runs, pt_missing = load_pt(root)
    lines: list[dict[str, Any]] = [{"kind": "summary", "dg_missing": missing, "pt_missing": pt_missing}]
    lines += [_dg_line(r) for r in runs + pt_runs]
    lines += [{"kind": "mtl", **row} for row in mtl]
    lines += [{"kind": "theory", **payload} for payload in theory]
    return _write(path, lines)


def export_pretrained(root: str | Path, path: str | Path) -> Path:
    """Replaces the pretrained regime's lines of the records file ``path`` (its runs, its theory
    payloads and its count of unfinished jobs) with those under ``root``, keeping every other line
    as it is: the pretrained regime can run on another machine than the first study's runs."""
    from torchsage.study.pretrained import PT_CELLS, in_pt_cells
    from torchsage.study.pretrained_report import load_pt, load_pt_theory

    lines = _lines(path)
    if not lines or lines[0].get("kind") != "summary":
        raise ValueError(f"{path} does not start with a summary line: is this a study records file?")
    pt_runs, pt_missing = load_pt(root)

    def pretrained(line: dict[str, Any]) -> bool:
        if line.get("kind") == "dg":
            return (line["dataset"], line["test_env"]) in PT_CELLS
        return line.get("kind") == "theory" and in_pt_cells(line)

    kept = [line for line in lines[1:] if not pretrained(line)]
    summary = {**lines[0], "pt_missing": pt_missing}
    theory = [{"kind": "theory", **payload} for payload in load_pt_theory(root)]
    return _write(path, [summary, *kept, *(_dg_line(r) for r in pt_runs), *theory])


def _dg_line(run: Any) -> dict[str, Any]:
    fields = asdict(run)
    fields["run"] = fields.pop("path").name  # the run directory's name, not the local path
    if fields["oracle_acc"] is None:  # the first study's lines as they were
        del fields["oracle_acc"]
    if math.isnan(fields["step_time"]):  # not logged: no field (JSON has no nan)
        del fields["step_time"]
    return {"kind": "dg", **fields}


def _write(path: str | Path, lines: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(line, sort_keys=True, allow_nan=False) + "\n" for line in lines)
    atomic_write_text(path, text)
    return Path(path)


def load(path: str | Path) -> tuple[list, int, list[dict[str, Any]], list[dict[str, Any]]]:
    """``(dg runs, DG jobs not finished, MultiDigits rows, theory payloads)`` from an exported file
    (the dg runs and payloads include the pretrained regime's; the count of jobs not finished is the
    first study's)."""
    return _read(path)[:4]


def load_pretrained(path: str | Path) -> tuple[list, int | None, list[dict[str, Any]]]:
    """``(the pretrained regime's runs, its jobs not finished, its theory payloads)`` from an
    exported file (``None`` jobs: a file exported before the pretrained regime existed; no payloads:
    one exported before its theory test)."""
    from torchsage.study.pretrained import PT_CELLS, in_pt_cells

    runs, _, _, theory, pt_missing = _read(path)
    return (
        [r for r in runs if (r.dataset, r.test_env) in PT_CELLS],
        pt_missing,
        [p for p in theory if in_pt_cells(p)],
    )


def _read(path: str | Path) -> tuple[list, int, list[dict[str, Any]], list[dict[str, Any]], int | None]:
    from torchsage.study.report import DGRun

    runs, missing, mtl, theory, pt_missing = [], 0, [], [], None
    for line in _lines(path):
        kind = line.pop("kind", None)
        if kind == "dg":
            run = line.pop("run")
            runs.append(DGRun(**line, path=Path(run)))
        elif kind == "mtl":
            mtl.append(line)
        elif kind == "theory":
            theory.append(line)
        elif kind == "summary":
            missing = int(line["dg_missing"])
            pt_missing = None if line.get("pt_missing") is None else int(line["pt_missing"])
        else:
            raise ValueError(f"{path}: unknown record kind {kind!r}; is this a study records file?")
    return runs, missing, mtl, theory, pt_missing


def _lines(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no study records at {path}: write them with `python -m torchsage.study export`"
        )
    lines, torn = read_json_lines(path)
    if torn:
        raise ValueError(f"{path}: {'; '.join(torn)}; export it again from the run directories")
    return lines
