"""The step-count pilot of the evidence study: where does training-domain accuracy plateau?

One trial seed per (data set, algorithm): a plateau measurement, not a comparison. Each run trains
``steps`` steps with a checkpoint every ``checkpoint_freq`` steps and records its wall and CPU time
(``resource.getrusage`` of this process) in ``pilot_times.jsonl`` next to the runs.

Run: ``python -m torchsage.study pilot --output-dir runs/study/pilot`` (resumable: finished runs
are skipped). Read: :func:`plateau_step` on each run's ``results.jsonl``.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchsage.files import UnreadableFileError
from torchsage.harness.records import append_json_line, read_json_lines

__all__ = ["PILOT_CELLS", "plateau_step", "run_pilot", "summary", "train_accuracy_curve"]

#: (data set, held-out environment, algorithm): the hardest held-out domain of each suite in
#: docs/results.md (RotatedDigits 0deg, ColoredDigits -90%), ERM and SAGE at their defaults.
PILOT_CELLS: tuple[tuple[str, int, str], ...] = (
    ("RotatedDigits", 0, "ERM"),
    ("RotatedDigits", 0, "SAGE"),
    ("ColoredDigits", 2, "ERM"),
    ("ColoredDigits", 2, "SAGE"),
)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_pilot(
    output_dir: str | Path,
    steps: int = 2000,
    checkpoint_freq: int = 100,
    hparams: str = '{"cnn_width": 16, "batch_size": 32}',
    cells: Sequence[tuple[str, int, str]] = PILOT_CELLS,
) -> Path:
    """Trains every pilot cell (skipping finished ones) and appends its times to ``pilot_times.jsonl``."""
    from torchsage.dg.train import TrainArgs, train
    from torchsage.harness.seeds import stable_seed

    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for dataset, test_env, algorithm in cells:
        out = root / f"{dataset}-{test_env}-{algorithm}"
        if (out / "done").exists():
            continue
        seed = stable_seed(["study", dataset, [test_env], 0])
        wall, cpu = time.perf_counter(), _cpu_seconds()
        train(
            TrainArgs(
                dataset=dataset,
                algorithm=algorithm,
                test_envs=[test_env],
                output_dir=str(out),
                steps=steps,
                checkpoint_freq=checkpoint_freq,
                seed=seed,
                trial_seed=0,
                hparams=hparams,
                progress=False,
            )
        )
        record = {
            "run": out.name,
            "steps": steps,
            "checkpoint_freq": checkpoint_freq,
            "wall_s": time.perf_counter() - wall,
            "cpu_s": _cpu_seconds() - cpu,
        }
        append_json_line(root / "pilot_times.jsonl", record)
    return root


def _whole_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a finished run's JSON-lines file; a damaged line is an error naming it."""
    records, problems = read_json_lines(path)
    if problems:
        raise UnreadableFileError(f"{path} is damaged: {problems[0]}", path)
    return records


def train_accuracy_curve(results: str | Path) -> list[tuple[int, float]]:
    """(step, mean validation accuracy of the training domains' ``out`` splits) per checkpoint."""
    curve = []
    for record in _whole_records(results):
        test = set(record["args"]["test_envs"])
        envs = sorted(
            {int(k[3:].split("_")[0]) for k in record if k.startswith("env") and k.endswith("_out_acc")}
        )
        values = [record[f"env{i}_out_acc"] for i in envs if i not in test]
        curve.append((int(record["step"]), sum(values) / len(values)))
    return curve


def plateau_step(curve: Sequence[tuple[int, float]], tolerance: float = 0.01, tail: float = 0.25) -> int:
    """The first checkpoint step from which the accuracy never falls more than ``tolerance`` below
    the plateau level, the mean over the last ``tail`` of the checkpoints.

    One seed's curve is noisy (a point or so between checkpoints here), hence a level averaged
    over the tail and a tolerance of one point.

    Example:
        >>> plateau_step([(0, 0.1), (100, 0.8), (200, 0.95), (300, 0.96), (400, 0.955), (500, 0.96)])
        200
    """
    if not curve:
        raise ValueError("plateau_step needs at least one checkpoint")
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"tail must lie in (0, 1], got {tail}")
    points = sorted(curve)
    k = max(1, round(tail * len(points)))
    level = sum(acc for _, acc in points[-k:]) / k
    step = points[-1][0]
    for s, acc in reversed(points):
        if acc < level - tolerance:
            break
        step = s
    return step


def summary(output_dir: str | Path, tolerance: float = 0.01) -> str:
    """One line per finished pilot run: wall and CPU time, CPU per step, the training-domain
    validation accuracy's plateau level (mean of the last quarter) and :func:`plateau_step`."""
    root = Path(output_dir)
    times = {}
    if (root / "pilot_times.jsonl").exists():
        times = {record["run"]: record for record in _whole_records(root / "pilot_times.jsonl")}
    lines = [f"{'run':<24}{'steps':>6}{'wall s':>8}{'CPU s':>8}{'CPU s/step':>11}{'level':>7}{'plateau':>8}"]
    for run in sorted(p for p in root.iterdir() if (p / "done").exists()):
        curve = train_accuracy_curve(run / "results.jsonl")
        k = max(1, round(0.25 * len(curve)))
        level = sum(a for _, a in curve[-k:]) / k
        t = times.get(run.name, {})
        steps = t.get("steps", curve[-1][0] + 1)
        wall, cpu = t.get("wall_s", float("nan")), t.get("cpu_s", float("nan"))
        lines.append(
            f"{run.name:<24}{steps:>6}{wall:>8.0f}{cpu:>8.0f}{cpu / steps:>11.4f}{level:>7.4f}"
            f"{plateau_step(curve, tolerance):>8}"
        )
    return "\n".join(lines)
