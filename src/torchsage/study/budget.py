"""The evidence study's CPU budget: measured per-run costs times the specification's run counts.

The costs are this project's development machine's (2 shared CPU cores, one torch thread per
run), measured by the pilot (``python -m torchsage.study pilot``, ``pilot_times.jsonl``) and, for
MultiDigits, taken from the 10-epoch sweep of docs/results.md. They include each pilot run's 21
evaluations, so the study's runs (2 evaluations each) should come out cheaper: an upper estimate.
"""

from __future__ import annotations

from pathlib import Path

from torchsage.study.parts import ALL_PARTS, all_part_jobs
from torchsage.study.pretrained import PT_PARTS, SUBSET_SUFFIXES
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
#: runs the pretrained regime's theory test measures (every run of pt-symbola-core) and the CPU
#: seconds of one, its classifier's terms: measured 12.3 on one run, loading included
PT_THEORY_RUNS = 40
PT_THEORY_RUN_CPU = 13.0


def _dg_cost(settings: dict) -> float:
    passes = 1 if settings["algorithm"] == "ERM" else 2
    return RUN_OVERHEAD_CPU + settings["steps"] * CPU_PER_STEP[(settings["dataset"], passes)]


def _mtl_cost(settings: dict) -> float:
    return MTL_RUN_CPU["plain" if settings["method"] == "plain" else "two-pass"]


def estimate(root: str | Path = "runs/study") -> dict[str, tuple[int, int, float, float]]:
    """``{part: (runs, finished, CPU-hours in all, CPU-hours left)}``, plus ``"theory"`` and
    ``"all"``: every run once, however many parts it is a run of (a core part's runs are runs of its
    cell; the gamma measurement reuses the cells' ERM runs)."""
    out, every, pretrained = {}, {}, set()
    for part in ALL_PARTS:
        jobs = all_part_jobs(root, part)
        cost = _mtl_cost if part == "mtl" else _dg_cost
        rows = [(j.output_dir, cost(j.settings) / 3600, j.state == "done") for j in jobs]
        every.update((d, (c, done)) for d, c, done in rows)
        if part in PT_PARTS:
            pretrained.update(d for d, *_ in rows)
        out[part] = _row(rows)
    # a run's theory payload is the pretrained regime's if the run is (no file needs reading)
    measured = [p.parent for p in Path(root).glob("dg/*/theory.json")]
    pt_done = sum(d in pretrained for d in measured)
    out["theory"] = _theory_row(THEORY_MAX_RUNS, len(measured) - pt_done, THEORY_RUN_CPU)
    out["theory-pretrained"] = _theory_row(PT_THEORY_RUNS, pt_done, PT_THEORY_RUN_CPU)
    runs = _row([(d, c, done) for d, (c, done) in every.items()])
    theory = [out["theory"], out["theory-pretrained"]]
    out["all"] = tuple(a + b + c for a, b, c in zip(runs, *theory, strict=True))
    return out


def _theory_row(runs: int, done: int, cpu: float) -> tuple[int, int, float, float]:
    return runs, done, runs * cpu / 3600, max(0, runs - done) * cpu / 3600


def _row(rows: list[tuple[Path, float, bool]]) -> tuple[int, int, float, float]:
    left = sum(c for _, c, done in rows if not done)
    return len(rows), sum(done for *_, done in rows), sum(c for _, c, _ in rows), left


def plan_text(root: str | Path = "runs/study") -> str:
    """The plan as a table: runs, finished, CPU-hours in all and left, per part."""
    rows = estimate(root)
    lines = [
        f"evidence study under {root}: {N_TRIALS} trials, DG steps {DG_STEPS}, "
        f"MTL solvers {', '.join(MTL_SOLVERS)}",
        f"{'part':<22}{'runs':>6}{'done':>6}{'CPU-h':>8}{'left':>8}",
    ]
    for part, (n, done, total, left) in rows.items():
        suffix = next((s for s in SUBSET_SUFFIXES if part.endswith(s)), None)
        note = f"  (runs of {part.removesuffix(suffix)})" if suffix else ""
        note = "  (each run once)" if part == "all" else note
        lines.append(f"{part:<22}{n:>6}{done:>6}{total:>8.2f}{left:>8.2f}{note}")
    return "\n".join(lines)
