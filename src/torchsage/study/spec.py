"""The specification of the evidence study (issue 13), fixed before any of its results were seen.

docs/study.md gives the rationale and the budget arithmetic; this module is what the commands run.

**Domain generalization.** Four cells (data set, held-out domain): the hardest and the easiest
held-out domain of each embedded suite by ERM's accuracy in docs/results.md (200-step runs, the
only numbers there were when the study was fixed): RotatedDigits 0deg and 45deg, ColoredDigits
-90% and +80%. In every cell, :data:`N_TRIALS` trials; a trial ``t`` fixes one seed for
initialisation and minibatch order (:func:`trial_seed`, the same for every method and every
hyperparameter choice) and the in/out splits (``--trial-seed t``), so every method is measured
run against run. Per trial, the arms of :func:`dg_arms`:

* ``ERM``: the shared settings (Adam, lr 1e-3, batch 32 per domain, width-16 MNIST CNN);
* ``SAM``: :data:`SAM_GRID` (rho), the best by training-domain validation;
* ``SAGE``: :data:`SAGE_GRID` (rho scaling, rho, gamma and the disagreement measure in a
  4-run orthogonal array: as many choices as SAM), the best by training-domain validation;
* ``SAGE (default)``: ``torchsage.SAGE``'s defaults as the harness sets them;
* ``SAGE (authors-dg)``: the values of ``torchsage.preset("authors-dg")`` (SGD lr 2e-3, weight
  decay 5e-4, rho 0.01 per weight matrix, cosine disagreement, gamma 1.0);
* ``SAGE_CurvatureOnly`` and ``SAGE_AlignmentOnly``: the ablations at SAGE's default settings.

Every run trains :data:`DG_STEPS` steps of its data set (from the pilot, :mod:`torchsage.study.pilot`), is
evaluated at its first and last step (training-domain validation reads the last) and saves its
weights for the theory test.

**Follow-up: gamma and the disagreement measure.** The 4-run grid moves gamma and the measure
together, so the main results cannot say which of the two matters. Added after the main results
had been seen (docs/study.md says so): the 2 x 2 of gamma {1e-3, 1e-2} and the measure
{normalized_std, cosine} at the default rho scaling and rho (:func:`gamma_measure_arms`), on the
same trials of :data:`FOLLOWUP_CELLS`; the default is one of its four runs and is not run again.

**Part: ascent schedules (issue 22).** Beyond the paper, defined after the main results: SAGE at
its defaults with the ascent at every step, every 5th step (:class:`torchsage.optim.EveryK`) and
when the disagreement is at least its running mean (:class:`torchsage.optim.Triggered`, threshold
0) (:func:`schedule_arms`), on the same trials of :data:`FOLLOWUP_CELLS`, ColoredDigits first (its
runs are the cheaper). The every-step arm is run again here rather than read from the main runs:
the polar factor's default form changed since (``polar_method="auto"``), so its runs are not
bit-identical to the main study's.

**Multi-task learning.** MultiDigits, LS, UPGrad and FAMO, each plain, with SAGE (the harness's
defaults), with SAM and with SAGE under ``--preset authors``, 10 epochs, seeds 0-9 (the seed fixes
initialisation and batch order for every solver and method), plus the single-task baselines
Delta-m% is measured against.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchsage.harness.jobs import HashedJob
from torchsage.harness.seeds import stable_seed

__all__ = [
    "BASE_HPARAMS",
    "DG_CELLS",
    "DG_STEPS",
    "FOLLOWUP_CELLS",
    "GAMMA_MEASURE_GRID",
    "MTL_OPTIONS",
    "MTL_SOLVERS",
    "N_TRIALS",
    "PARTS",
    "SAGE_DEFAULTS",
    "SAGE_GRID",
    "SAM_GRID",
    "Arm",
    "authors_dg_hparams",
    "dg_arms",
    "dg_jobs",
    "gamma_measure_arms",
    "mtl_jobs",
    "part_jobs",
    "schedule_arms",
    "trial_seed",
]

#: (data set, held-out environment index): the hardest and the easiest domain of each suite
DG_CELLS: tuple[tuple[str, int], ...] = (
    ("RotatedDigits", 0),  # 0deg
    ("RotatedDigits", 3),  # 45deg
    ("ColoredDigits", 2),  # -90%
    ("ColoredDigits", 1),  # +80%
)
N_TRIALS = 10
#: training steps of the DG runs, per data set, from the pilot (docs/study.md, "Pilot"): RotatedDigits
#: plateaued at 400 (ERM) and 600 (SAGE) steps, 100 more for margin; ColoredDigits reached its level
#: within 300 steps but SAGE's curve met the plateau rule only from 1500 on, and its steps are cheap
DG_STEPS: dict[str, int] = {"RotatedDigits": 700, "ColoredDigits": 1500}
#: every DG run's shared settings (the rest are the harness's defaults for the small image sets)
BASE_HPARAMS: dict[str, Any] = {"cnn_width": 16, "batch_size": 32}

#: SAM's choices: rho (the harness's default 0.05 among them)
SAM_GRID: tuple[dict[str, Any], ...] = tuple({"rho": r} for r in (0.01, 0.02, 0.05, 0.1))

#: SAGE's choices, as many as SAM's: rho scaling {global (the current default), weight (the
#: authors')} x rho {0.01, 0.05}, with (gamma, disagreement measure) as the third column of the
#: 4-run orthogonal array, so each level of each factor occurs twice and each pair of the
#: factors' levels once among scaling, rho and the (gamma, measure) pair. The current default
#: (global, 0.05, normalized_std, 1e-3) is one of the choices. Four choices cannot cross four
#: two-level factors; docs/study.md says what the grid can and cannot tell apart.
SAGE_GRID: tuple[dict[str, Any], ...] = tuple(
    {"rho_scaling": scaling, "rho": rho, "gamma": gamma, "disagreement": measure}
    for scaling, rho, gamma, measure in (
        ("global", 0.01, 1e-2, "cosine"),
        ("global", 0.05, 1e-3, "normalized_std"),
        ("weight", 0.01, 1e-3, "normalized_std"),
        ("weight", 0.05, 1e-2, "cosine"),
    )
)
#: the DG harness's SAGE defaults, spelt out (a test checks them against the harness): the
#: ``SAGE (default)`` arm and its grid twin are one run
SAGE_DEFAULTS: dict[str, Any] = {
    "rho_scaling": "global",
    "rho": 0.05,
    "gamma": 1e-3,
    "disagreement": "normalized_std",
}


def authors_dg_hparams() -> dict[str, Any]:
    """The DG harness hyperparameters that reproduce ``torchsage.preset("authors-dg")``.

    The harness's ``"sgd"`` optimizer is SGD with momentum 0.9, the preset's momentum.

    Example:
        >>> authors_dg_hparams()["rho_scaling"], authors_dg_hparams()["optimizer"]
        ('weight', 'sgd')
    """
    import torch

    import torchsage

    p = torchsage.preset("authors-dg")
    if p["base_optimizer"] is not torch.optim.SGD or p["momentum"] != 0.9:
        raise ValueError("the authors-dg preset no longer matches the harness's SGD (momentum 0.9)")
    keys = ("lr", "weight_decay", "rho", "rho_scaling", "disagreement", "gamma", "ns_steps")
    return {"optimizer": "sgd", **{k: p[k] for k in keys}}


@dataclass(frozen=True)
class Arm:
    """One hyperparameter choice of one method.

    Attributes:
        method: the row of the tables (the choices of one method compete by training-domain
            validation within each trial).
        algorithm: the DG harness's algorithm.
        hparams: the overrides of the shared settings this choice makes.
        base: the shared settings (:data:`BASE_HPARAMS` when ``None``; the pretrained-regime study
            has its own, :data:`torchsage.study.pretrained.PT_BASE_HPARAMS`).
    """

    method: str
    algorithm: str
    hparams: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] | None = None

    def hparams_json(self) -> str:
        base = BASE_HPARAMS if self.base is None else self.base
        return json.dumps({**base, **self.hparams}, sort_keys=True)


def dg_arms() -> list[Arm]:
    """Every arm of a DG trial, in table order."""
    arms = [Arm("ERM", "ERM")]
    arms += [Arm("SAM", "SAM", h) for h in SAM_GRID]
    arms += [Arm("SAGE", "SAGE", h) for h in SAGE_GRID]
    arms.append(Arm("SAGE (default)", "SAGE", dict(SAGE_DEFAULTS)))
    arms.append(Arm("SAGE (authors-dg)", "SAGE", authors_dg_hparams()))
    ablation = {k: v for k, v in SAGE_DEFAULTS.items() if k != "gamma"}
    arms.append(Arm("SAGE_CurvatureOnly", "SAGE_CurvatureOnly", ablation))
    arms.append(Arm("SAGE_AlignmentOnly", "SAGE_AlignmentOnly", {**SAGE_DEFAULTS, "rho": 0.0}))
    return arms


#: the follow-up's cells: RotatedDigits 0deg, the one cell where the two-pass methods leaned above
#: ERM, and ColoredDigits -90%, where the grid's choices differed most; two of the four to keep the
#: follow-up near one CPU-hour (docs/study.md, "Budget")
FOLLOWUP_CELLS: tuple[tuple[str, int], ...] = (("RotatedDigits", 0), ("ColoredDigits", 2))
#: the follow-up's 2 x 2: gamma x disagreement measure at the default rho scaling and rho
GAMMA_MEASURE_GRID: tuple[dict[str, Any], ...] = tuple(
    {**SAGE_DEFAULTS, "gamma": gamma, "disagreement": measure}
    for gamma in (1e-3, 1e-2)
    for measure in ("normalized_std", "cosine")
)


def gamma_measure_arms() -> list[Arm]:
    """The follow-up's arms, one method each (no selection): ``"SAGE g=<gamma> <measure>"``.

    Example:
        >>> [a.method for a in gamma_measure_arms()][:2]
        ['SAGE g=0.001 normalized_std', 'SAGE g=0.001 cosine']
    """
    return [Arm(f"SAGE g={h['gamma']:g} {h['disagreement']}", "SAGE", h) for h in GAMMA_MEASURE_GRID]


#: the schedules part's arms: (method, schedule hyperparameters of the DG harness)
SCHEDULES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("SAGE every step", {"ascent_every": 1}),  # named, so its runs are new: see the module docstring
    ("SAGE every 5", {"ascent_every": 5}),
    ("SAGE trigger D", {"ascent_trigger": "disagreement", "ascent_threshold": 0.0}),
)


def schedule_arms() -> list[Arm]:
    """The schedules part's arms, one method each (no selection), at SAGE's defaults.

    Example:
        >>> [a.method for a in schedule_arms()]
        ['SAGE every step', 'SAGE every 5', 'SAGE trigger D']
    """
    return [Arm(method, "SAGE", {**SAGE_DEFAULTS, **h}) for method, h in SCHEDULES]


def trial_seed(dataset: str, test_env: int, trial: int) -> int:
    """The initialisation and minibatch seed of trial ``trial`` in a cell: the same for every
    method and hyperparameter choice (the harness's own sweep hashes the algorithm in too)."""
    return stable_seed(["evidence-study", dataset, [int(test_env)], int(trial)])


def dg_jobs(
    root: str | Path,
    cells: Sequence[tuple[str, int]] = DG_CELLS,
    n_trials: int = N_TRIALS,
    steps: int | None = None,
    arms: Sequence[Arm] | None = None,
) -> list[HashedJob]:
    """The ``torchsage dg train`` runs of the DG study, trial by trial (so a part stopped early
    leaves whole trials), each in ``root/dg/<md5 of its settings>``."""
    jobs = []
    for dataset, env in cells:
        for trial in range(n_trials):
            seed = trial_seed(dataset, env, trial)
            n_steps = DG_STEPS[dataset] if steps is None else steps
            seen: set[tuple[str, str]] = set()
            for arm in dg_arms() if arms is None else arms:
                hp = arm.hparams_json()
                if (arm.algorithm, hp) in seen:  # e.g. SAGE (default) and its grid twin: one run
                    continue
                seen.add((arm.algorithm, hp))
                argv = ["dg", "train", "--dataset", dataset, "--algorithm", arm.algorithm]
                argv += ["--test-envs", str(env), "--steps", str(n_steps), "--checkpoint-freq", str(n_steps)]
                argv += ["--hparams-seed", "0", "--trial-seed", str(trial), "--seed", str(seed)]
                argv += ["--hparams", hp, "--save-model"]
                settings = {
                    "dataset": dataset,
                    "test_env": env,
                    "trial": trial,
                    "seed": seed,
                    "algorithm": arm.algorithm,
                    "hparams": json.loads(hp),
                    "steps": n_steps,
                }
                label = f"{dataset} env {env} trial {trial} {arm.algorithm} {json.dumps(arm.hparams)}"
                jobs.append(HashedJob(root, argv, settings, label, subdir="dg"))
    return jobs


#: the MultiDigits solvers (stl: the single-task baselines of Delta-m%)
MTL_SOLVERS = ("stl", "ls", "upgrad", "famo")
#: ``torchsage mtl train`` options of every MTL run (the settings of docs/results.md's MTL sweep)
MTL_OPTIONS = ("--epochs", "10", "--n-train", "3000", "--n-test", "1000", "--batch-size", "64")


def mtl_jobs(root: str | Path, n_seeds: int = N_TRIALS) -> list[HashedJob]:
    """The MultiDigits runs: plain, SAGE and SAM, then SAGE with ``--preset authors`` (stl first)."""
    from torchsage.mtl.sweep import make_jobs

    seeds = list(range(n_seeds))
    mtl_root = Path(root) / "mtl"
    jobs = make_jobs(mtl_root, "multidigits", MTL_SOLVERS, ["plain", "sage", "sam"], seeds, MTL_OPTIONS)
    # stl named again so the preset runs get --stl-dir too; its runs are the same, dropped here
    options = [*MTL_OPTIONS, "--preset", "authors"]
    preset = make_jobs(mtl_root, "multidigits", MTL_SOLVERS, ["sage"], seeds, options)
    known = {j.output_dir for j in jobs}
    return jobs + [j for j in preset if j.output_dir not in known]


def _cell_part(dataset: str, env: int) -> str:
    return f"dg-{'rotated' if dataset == 'RotatedDigits' else 'colored'}-{env}"


#: the parts of the study, each a few CPU-hours at most (docs/study.md has the estimate of each)
PARTS: tuple[str, ...] = (
    *(_cell_part(d, e) for d, e in DG_CELLS),
    "mtl",
    "dg-gamma-measure",
    "dg-schedules",
)


def part_jobs(root: str | Path, part: str) -> list[HashedJob]:
    """The runs of one part of the study (see :data:`PARTS`).

    Raises:
        ValueError: an unknown part (the message lists them).

    Example:
        >>> len(part_jobs("runs/study", "dg-rotated-0")) == N_TRIALS * (len(dg_arms()) - 1)
        True
    """
    for dataset, env in DG_CELLS:
        if part == _cell_part(dataset, env):
            return dg_jobs(root, cells=[(dataset, env)])
    if part == "mtl":
        return mtl_jobs(root)
    if part == "dg-gamma-measure":
        return dg_jobs(root, cells=FOLLOWUP_CELLS, arms=gamma_measure_arms())
    if part == "dg-schedules":
        return dg_jobs(root, cells=FOLLOWUP_CELLS[::-1], arms=schedule_arms())
    raise ValueError(f"unknown part {part!r}: use one of {', '.join(PARTS)}")
