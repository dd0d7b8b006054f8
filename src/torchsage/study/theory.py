"""The theory test of the evidence study: do the two terms of the excess risk predict the
out-of-domain gap?

For a random sample of the DG runs (each saved its weights; :func:`sample_cells`: the same number
from every cell, drawn once the cell has finished), :func:`measure_run` measures at
the final weights, with :func:`torchsage.diagnostics.decompose` on the first ``batch_size``
samples of every training domain's ``in`` split:

* the alignment term :math:`\\operatorname{tr}((\\bar H + \\lambda I)^{-1}\\Sigma_g)` (conjugate
  gradients; ``nan`` when :math:`\\bar H + \\lambda I` is found indefinite: those runs are counted
  and left out of the fits);
* the curvature terms :math:`\\operatorname{tr}\\bar H` (Hutchinson, with its standard error) and
  :math:`\\lambda_{\\max}(\\bar H)` (Lanczos);

and writes them to ``theory.json`` in the run directory (atomically; a run that has one is
skipped, so the command resumes). ``layer="classifier"`` measures the classifier alone, on the
penultimate features of the same batches (the pretrained regime's runs: :func:`sample_pretrained`,
docs/study.md, "The pretrained regime"). :func:`gap` is the run's out-of-domain gap: the mean
validation accuracy of the training domains minus the test domain's accuracy, at the last step.
:func:`fits` regresses the gap on each term alone and on alignment and trace together
(:func:`torchsage.study.stats.least_squares`: R^2 and bootstrap intervals): all runs pooled, all
runs with one intercept per cell, and each cell alone.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchsage.files import read_json_file, safe_torch_load
from torchsage.harness.records import atomic_write_text, read_json_lines
from torchsage.study.stats import Fit, least_squares

__all__ = [
    "LAYERS",
    "THEORY_FILE",
    "THEORY_SETTINGS",
    "cell_label",
    "classifier_view",
    "fits",
    "gap",
    "load_theory",
    "measure_run",
    "measure_sample",
    "payload_layer",
    "sample_cells",
    "sample_pretrained",
    "sample_runs",
]

THEORY_FILE = "theory.json"
#: what :func:`measure_run` differentiates: every trained parameter, or the classifier alone on the
#: penultimate features
LAYERS = ("all", "classifier")
#: decompose() settings of the study: sized so one run costs well under a CPU-minute (docs/study.md)
THEORY_SETTINGS: dict[str, Any] = {
    "batch_size": 64,
    # a trained RotatedDigits SAGE run had a smallest Ritz value of -0.97 (largest eigenvalue 192):
    # with damping 1e-3 the alignment term was undefined; 5 keeps H + 5 I positive definite with
    # margin and the solves well conditioned (docs/study.md, "The theory test")
    "damping": 5.0,
    "cg_tol": 1e-4,
    "cg_max_iter": 60,
    "hutchinson_samples": 30,
    "lanczos_steps": 20,
    "seed": 0,
    # decompose()'s exact Hessian (True) for a small problem; "auto" would switch by size
    "exact": False,
}


def _last_record(run_dir: Path) -> dict[str, Any]:
    records, _ = read_json_lines(run_dir / "results.jsonl")
    if not records:
        raise ValueError(f"{run_dir} has no readable result line")
    return records[-1]


def gap(record: dict[str, Any]) -> float:
    """Training-domain validation accuracy (mean of the ``out`` splits) minus test-domain accuracy
    (mean of the ``in`` splits of the test environments) of one result line.

    Example:
        >>> r = {"args": {"test_envs": [1]}, "env0_in_acc": 0.9, "env0_out_acc": 0.8,
        ...      "env1_in_acc": 0.5, "env1_out_acc": 0.4, "env2_in_acc": 0.9, "env2_out_acc": 1.0}
        >>> round(gap(r), 6)
        0.4
    """
    test = {int(i) for i in record["args"]["test_envs"]}
    envs = sorted({int(k[3:].split("_")[0]) for k in record if k.startswith("env") and k.endswith("_in_acc")})
    train = [record[f"env{i}_out_acc"] for i in envs if i not in test]
    held = [record[f"env{i}_in_acc"] for i in envs if i in test]
    if not train or not held:
        raise ValueError("a result line needs at least one training and one test environment")
    return sum(train) / len(train) - sum(held) / len(held)


def sample_runs(run_dirs: Sequence[Path], max_runs: int, seed: int = 0) -> list[Path]:
    """A random sample of at most ``max_runs`` of the finished runs that saved a model, drawn as a
    prefix of one seeded permutation of their sorted names (a later call with more finished runs
    keeps the earlier sample's order as far as it can)."""
    ready = sorted(p for p in run_dirs if (p / "done").exists() and (p / "model.pt").exists())
    random.Random(seed).shuffle(ready)
    return ready[:max_runs]


def measure_run(
    run_dir: str | Path, settings: dict[str, Any] | None = None, layer: str = "all"
) -> dict[str, Any]:
    """Measures the terms of one run and writes ``theory.json`` there (returns its content).

    ``settings`` override :data:`THEORY_SETTINGS` (their keys only). ``layer``: ``"all"``, every
    trained parameter of the network; ``"classifier"``, the classifier's alone, on the penultimate
    features of the same batches, computed once (:func:`classifier_view`). The payload's settings
    record the layer (payloads written before it have none: ``"all"``, :func:`payload_layer`); the
    gap is the run's own either way."""
    import torch

    from torchsage.dg.checkpoint import load_dg_model
    from torchsage.diagnostics import decompose

    run_dir = Path(run_dir)
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {layer!r}")
    unknown = sorted(set(settings or {}) - set(THEORY_SETTINGS))
    if unknown:
        raise ValueError(f"unknown theory settings {', '.join(unknown)}; known: {', '.join(THEORY_SETTINGS)}")
    s = {**THEORY_SETTINGS, **(settings or {})}
    checkpoint = safe_torch_load(run_dir / "model.pt", what="model checkpoint")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{run_dir / 'model.pt'} is not a torchsage model checkpoint (a dict)")
    model, batches, names = load_dg_model(checkpoint, int(s["batch_size"]))
    if layer == "classifier":
        model, batches = classifier_view(model, batches)
    torch.manual_seed(int(s["seed"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # recorded in the report's warnings
        report = decompose(
            model,
            torch.nn.functional.cross_entropy,
            batches,
            damping=float(s["damping"]),
            cg_tol=float(s["cg_tol"]),
            cg_max_iter=int(s["cg_max_iter"]),
            hutchinson_samples=int(s["hutchinson_samples"]),
            lanczos_steps=int(s["lanczos_steps"]),
            exact=s["exact"],
            seed=int(s["seed"]),
            progress=False,
        )
    record = _last_record(run_dir)
    payload = {
        "run": run_dir.name,
        "dataset": record["args"]["dataset"],
        "algorithm": record["args"]["algorithm"],
        "test_envs": record["args"]["test_envs"],
        "gap": gap(record),
        "distributions": names,
        "settings": {**s, "layer": layer},
        "report": report.as_dict(),
    }
    atomic_write_text(run_dir / THEORY_FILE, json.dumps(payload, indent=1, allow_nan=False))
    return payload


def classifier_view(network: Any, batches: Sequence[tuple[Any, Any]]) -> tuple[Any, list[tuple[Any, Any]]]:
    """``(classifier, batches of penultimate features)`` of a DG network (``Sequential(featurizer,
    classifier)``, :func:`torchsage.dg.checkpoint.load_dg_model`): the featurizer runs once per
    batch in evaluation mode under ``no_grad`` (so the features are constants of the classifier's
    loss), and every module's training flag is left as it was."""
    import torch

    featurizer, head = network[0], network[1]
    modes = [(m, m.training) for m in featurizer.modules()]
    try:
        featurizer.eval()
        with torch.no_grad():
            features = [(featurizer(x).detach(), y) for x, y in batches]
    finally:
        for module, mode in modes:
            module.training = mode
    return head, features


def payload_layer(payload: dict[str, Any]) -> str:
    """The layer a theory payload was measured on (``"all"`` for payloads written before
    :func:`measure_run` had ``layer``)."""
    return str(payload.get("settings", {}).get("layer", "all"))


def load_theory(root: str | Path) -> list[dict[str, Any]]:
    """The ``theory.json`` payloads of every measured DG run under ``root`` (sorted by run)."""
    paths = sorted((Path(root) / "dg").glob(f"*/{THEORY_FILE}"))
    return [read_json_file(p, what="theory terms") for p in paths]


def sample_cells(root: str | Path, max_runs: int, seed: int = 0) -> tuple[list[Path], list[str]]:
    """The theory sample: ``max_runs // (number of cells)`` runs of every DG cell of the study,
    drawn with :func:`sample_runs` from the cell's runs once all of them have finished (so a cell's
    sample does not depend on when the command ran; the study's parts finish at different times).
    Returns the sample and the names of the cells not finished yet."""
    from torchsage.study.spec import DG_CELLS, dg_jobs

    per_cell = max_runs // len(DG_CELLS)
    sample, waiting = [], []
    for i, cell in enumerate(DG_CELLS):
        jobs = dg_jobs(root, cells=[cell])
        if any(job.state != "done" for job in jobs):
            waiting.append(f"{cell[0]} env {cell[1]}")
            continue
        sample += sample_runs(sorted(job.output_dir for job in jobs), per_cell, seed + i)
    return sample, waiting


def sample_pretrained(root: str | Path, max_runs: int = 40, seed: int = 0) -> tuple[list[Path], int]:
    """The pretrained regime's theory sample: at most ``max_runs`` of the finished runs of the part
    ``pt-symbola-core`` (:func:`torchsage.study.pretrained.pt_jobs` with ``core=True`` on the first
    cell; 40 runs, so the default takes them all), drawn with :func:`sample_runs`. Returns the
    sample and the number of the part's runs not finished (left out)."""
    from torchsage.study.pretrained import PT_CELLS, pt_jobs

    jobs = pt_jobs(str(root), cells=PT_CELLS[:1], core=True)
    waiting = sum(job.state != "done" for job in jobs)
    return sample_runs(sorted(job.output_dir for job in jobs), max_runs, seed), waiting


def measure_sample(run_dirs: Sequence[Path], progress: bool = False, layer: str = "all") -> int:
    """Measures the runs of ``run_dirs`` that lack ``theory.json`` (on ``layer``, as
    :func:`measure_run`); returns how many it measured."""
    from torchsage.harness.progress import bar

    todo = [run_dir for run_dir in run_dirs if not (run_dir / THEORY_FILE).exists()]
    for run_dir in bar(todo, desc="theory", unit="run", disable=not progress):
        measure_run(run_dir, layer=layer)
    return len(todo)


def _term_rows(payloads: Sequence[dict[str, Any]]) -> tuple[list[dict[str, float]], int]:
    rows, dropped = [], 0
    for p in payloads:
        r = p["report"]
        alignment = r.get("alignment")
        if alignment is None or r.get("negative_curvature"):
            dropped += 1
            continue
        rows.append(
            {
                "gap": float(p["gap"]),
                "alignment": float(alignment),
                "trace": float(r["curvature_trace"]),
                "trace_stderr": float(r["curvature_trace_stderr"]),
                "lambda_max": float(r["curvature_top"][0]),
                # the measurements' own precision, reported beside the fits
                "cg_residual": float(r["alignment_residuals"]),
                "cg_iterations": int(max(r["cg_iterations"], default=0)),
                "lambda_residual": float(r["curvature_top_residuals"][0])
                if r.get("curvature_top_residuals")
                else math.nan,
                "dataset": p["dataset"],
                "cell": cell_label(p),
            }
        )
    return rows, dropped


#: the regressions of the gap: each term alone, then alignment and trace together
MODELS: tuple[tuple[str, ...], ...] = (("alignment",), ("trace",), ("lambda_max",), ("alignment", "trace"))


def cell_label(payload: dict[str, Any]) -> str:
    """``"<dataset> <test domain>"`` (``"RotatedDigits 0deg"``): the DG cell a theory payload
    belongs to; the domain's index where the data set is not registered."""
    from torchsage.dg.datasets import environment_names

    envs = [int(e) for e in payload.get("test_envs", [])]
    if not envs:
        return str(payload["dataset"])
    try:
        names = environment_names(payload["dataset"])
        return f"{payload['dataset']} " + ",".join(names[e] for e in envs)
    except (KeyError, ValueError, IndexError):
        return f"{payload['dataset']} env " + ",".join(str(e) for e in envs)


def _fit_models(
    rows: Sequence[dict[str, Any]], n_resamples: int, seed: int, within_cells: bool = False
) -> dict[str, Fit]:
    out: dict[str, Fit] = {}
    for names in MODELS:
        usable = [r for r in rows if all(r[n] > 0 for n in names)]
        groups = [r["cell"] for r in usable] if within_cells else None
        cells = set(groups or [None])
        if len(usable) < len(names) + len(cells) + 1 or (
            within_cells and min(groups.count(c) for c in cells) < 2  # type: ignore[union-attr]
        ):
            continue
        X = [[math.log10(r[n]) for n in names] for r in usable]
        y = [r["gap"] for r in usable]
        labels = [f"log10 {n}" for n in names]
        out[" + ".join(names)] = least_squares(
            X, y, labels, n_resamples=n_resamples, seed=seed, groups=groups
        )
    return out


def fits(payloads: Sequence[dict[str, Any]], n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The gap regressed on the terms (log10 of each term: they span orders of magnitude).

    Three scopes, each with every model of :data:`MODELS`:

    * ``fits``: all measured runs pooled, one intercept;
    * ``within``: all runs, one intercept per cell (:func:`least_squares` with ``groups``), so
      that a term that merely differs between data sets, as the gap does, cannot pass for a
      predictor; present with two or more cells;
    * ``cells``: ``{cell label: fits}``, each cell alone.

    Returns ``{"n", "dropped", "rows", "fits", "within", "cells"}``; a scope's fits are missing
    where it has fewer usable runs than a fit needs.
    """
    rows, dropped = _term_rows(payloads)
    cells = sorted({r["cell"] for r in rows})
    return {
        "n": len(rows),
        "dropped": dropped,
        "rows": rows,
        "fits": _fit_models(rows, n_resamples, seed),
        "within": _fit_models(rows, n_resamples, seed, within_cells=True) if len(cells) > 1 else {},
        "cells": {c: _fit_models([r for r in rows if r["cell"] == c], n_resamples, seed) for c in cells},
    }
