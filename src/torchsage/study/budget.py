"""The evidence study's CPU budget: measured per-run costs times the specification's run counts.

The costs are this project's development machine's (2 shared CPU cores, one torch thread per
run), measured by the pilot (``python -m torchsage.study pilot``, ``pilot_times.jsonl``) and, for
MultiDigits, taken from the 10-epoch sweep of docs/results.md. They include each pilot run's 21
evaluations, so the study's runs (2 evaluations each) should come out cheaper: an upper estimate.
"""

from __future__ import annotations

from pathlib import Path

from torchsage.study.parts import ALL_PARTS, all_part_jobs
from torchsage.study.spec import DG_STEPS, MTL_SOLVERS, N_TRIALS

__all__ = ["CPU_PER_STEP", "MTL_RUN_CPU", "THEORY_MAX_RUNS", "THEORY_RUN_CPU", "estimate", "plan_text"]

#: CPU seconds per training step (evaluations included), by data set and by passes per step
#: (1: ERM; 2: SAM, SAGE and its ablations). Source: the pilot (docs/study.md, "Pilot").
CPU_PER_STEP: dict[tuple[str, int], float] = {
    ("RotatedDigits", 1): 0.0601,
    ("RotatedDigits", 2): 0.1296,
    ("ColoredDigits", 1): 0.0141,
    ("ColoredDigits", 2): 0.0283,
    # the pretrained regime (EfficientNet-Lite0 from block 11 on the trunk cache, 16 images per
    # design, 5 training designs): its pilot's ERM and SAGE runs (400 steps, 17 evaluations and the
    # trunk cache included); two-pass runs are budgeted at SAGE's
    ("EmojiStyles", 1): 0.60,
    ("EmojiStyles", 2): 1.10,
}
#: CPU seconds of one run beyond its steps (process start, data, the final save)
RUN_OVERHEAD_CPU = 5.0
#: CPU seconds of one 10-epoch MultiDigits run: plain (and stl) and two-pass (SAGE, SAM); from
#: docs/results.md's 10-epoch sweep (4.5 CPU-minutes for 21 runs, SAGE 1.9x plain)
MTL_RUN_CPU = {"plain": 9.0, "two-pass": 17.0}
#: CPU seconds of measuring the terms on one run with THEORY_SETTINGS: measured 49 on one trained
#: RotatedDigits SAGE run of the study (154 Hessian-vector products, the solves converged in about
#: 20 iterations), rounded up
THEORY_RUN_CPU = 50.0
#: runs the theory part measures
THEORY_MAX_RUNS = 80


def _dg_cost(settings: dict) -> float:
    passes = 1 if settings["algorithm"] == "ERM" else 2
    return RUN_OVERHEAD_CPU + settings["steps"] * CPU_PER_STEP[(settings["dataset"], passes)]


def _mtl_cost(settings: dict) -> float:
    return MTL_RUN_CPU["plain" if settings["method"] == "plain" else "two-pass"]


def estimate(root: str | Path = "runs/study") -> dict[str, tuple[int, int, float, float]]:
    """``{part: (runs, finished, CPU-hours in all, CPU-hours left)}``, plus ``"theory"``."""
    out = {}
    for part in ALL_PARTS:
        jobs = all_part_jobs(root, part)
        cost = _mtl_cost if part == "mtl" else _dg_cost
        total = sum(cost(j.settings) for j in jobs) / 3600
        left = sum(cost(j.settings) for j in jobs if j.state != "done") / 3600
        out[part] = (len(jobs), sum(j.state == "done" for j in jobs), total, left)
    done = len(list(Path(root).glob("dg/*/theory.json")))
    out["theory"] = (
        THEORY_MAX_RUNS,
        done,
        THEORY_MAX_RUNS * THEORY_RUN_CPU / 3600,
        max(0, THEORY_MAX_RUNS - done) * THEORY_RUN_CPU / 3600,
    )
    return out


def plan_text(root: str | Path = "runs/study") -> str:
    """The plan as a table: runs, finished, CPU-hours in all and left, per part."""
    rows = estimate(root)
    lines = [
        f"evidence study under {root}: {N_TRIALS} trials, DG steps {DG_STEPS}, "
        f"MTL solvers {', '.join(MTL_SOLVERS)}",
        f"{'part':<18}{'runs':>6}{'done':>6}{'CPU-h':>8}{'left':>8}",
    ]
    for part, (n, done, total, left) in rows.items():
        note = f"  (runs of {part.removesuffix('-core')})" if part.endswith("-core") else ""
        lines.append(f"{part:<18}{n:>6}{done:>6}{total:>8.2f}{left:>8.2f}{note}")
    # a core part's runs are runs of its cell's part: counted once
    whole = [v for part, v in rows.items() if not part.endswith("-core")]
    total, left = sum(v[2] for v in whole), sum(v[3] for v in whole)
    runs, done = sum(v[0] for v in whole), sum(v[1] for v in whole)
    lines.append(f"{'all':<18}{runs:>6}{done:>6}{total:>8.2f}{left:>8.2f}")
    return "\n".join(lines)
