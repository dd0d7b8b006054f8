"""The evidence study in the paper's regime: fine-tuning an ImageNet-pretrained network under natural
style shift (EmojiStyles, EfficientNet-Lite0), fixed before any of its results were seen.

docs/study.md ("The pretrained regime") gives the rationale, the pilot and the budget; this module
is what the commands run.

**Cells.** EmojiStyles (six emoji designs, :mod:`torchsage.dg.emoji`) with one design held out:
:data:`PT_CELLS`, the hardest and the easiest held-out design of the probe that motivated the data
set (frozen Lite0 features and a linear classifier, each design held out in turn: Symbola's line
art lowest, Noto Color highest), as the first study took the hardest and easiest domain of each
suite. Every design held out would cost three times the budget (docs/study.md, "Budget").

**Training.** Every run fine-tunes the pretrained EfficientNet-Lite0 from block
:data:`PT_BASE_HPARAMS` ``train_from_block`` up (the pilot measured the whole network against the
top blocks, docs/study.md), from the exact trunk cache, at the harness's defaults for the image
sets otherwise (Adam, lr 5e-5, no weight decay, frozen BatchNorm), for :data:`PT_STEPS` steps.

**Arms**, per trial (:func:`pt_arms`): ERM; SAM over its rho grid; SAGE over its grid (the first
study's 4-run orthogonal array, the library's default among them); SAGE at its defaults; SAGE at
the authors' DG values (``torchsage.preset("authors-dg")``: SGD lr 2e-3, rho 0.01 per weight
matrix, gamma 1.0 on the cosine disagreement, the regime they were chosen for); the two ablations
at SAGE's defaults; and SAGM at the harness's defaults (rho 0.05, alpha 0.001), the strongest
SAM-family peer in the published DomainBed tables. Trials pair every arm: a trial fixes the
initialisation of the head, the minibatch order and the identity split.

**Follow-ups** on the first cell, runs of their own paired with the core part's trials (the same
trial seeds) and read against its ERM and ``SAGE (default)`` runs: the classifier's ascent
direction (:func:`pt_head_arms`), the ascent schedules (:func:`pt_schedule_arms`) and SAGE's noise
scale (:func:`pt_gamma_arms`).
"""

from __future__ import annotations

from typing import Any

from torchsage.harness.jobs import HashedJob
from torchsage.study.spec import (
    N_TRIALS,
    SAGE_DEFAULTS,
    SAGE_GRID,
    SAM_GRID,
    SCHEDULES,
    Arm,
    authors_dg_hparams,
    dg_jobs,
)

__all__ = [
    "PT_ABLATION_ARMS",
    "PT_BASE_HPARAMS",
    "PT_CELLS",
    "PT_CORE_ARMS",
    "PT_GAMMAS",
    "PT_PARTS",
    "PT_STEPS",
    "SUBSET_SUFFIXES",
    "in_pt_cells",
    "is_core",
    "pt_ablation_arms",
    "pt_arms",
    "pt_core_arms",
    "pt_gamma_arms",
    "pt_head_arms",
    "pt_jobs",
    "pt_part_jobs",
    "pt_schedule_arms",
]

#: (data set, held-out environment): Symbola (line art, the probe's hardest) and Noto Color (its easiest)
PT_CELLS: tuple[tuple[str, int], ...] = (("EmojiStyles", 5), ("EmojiStyles", 2))
#: training steps of every run, from the pilot (docs/study.md, "The pretrained regime"): at the
#: study's settings ERM's validation accuracy plateaued at step 250 and SAGE's at 375
PT_STEPS = 400
#: every run's shared settings (the rest are the harness's defaults for EmojiStyles)
PT_BASE_HPARAMS: dict[str, Any] = {"train_from_block": 11, "cache_trunk": True, "batch_size": 16}


def pt_arms() -> list[Arm]:
    """Every arm of a trial in the pretrained regime, in table order.

    Example:
        >>> [a.method for a in pt_arms()][-3:]
        ['SAGE_CurvatureOnly', 'SAGE_AlignmentOnly', 'SAGM']
    """
    base = PT_BASE_HPARAMS
    arms = [Arm("ERM", "ERM", base=base)]
    arms += [Arm("SAM", "SAM", h, base=base) for h in SAM_GRID]
    arms += [Arm("SAGE", "SAGE", h, base=base) for h in SAGE_GRID]
    arms.append(Arm("SAGE (default)", "SAGE", dict(SAGE_DEFAULTS), base=base))
    # the authors' plain Newton-Schulz iteration, as torchsage.preset("authors-dg") pins it
    authors = {**authors_dg_hparams(), "polar_method": "newton_schulz"}
    arms.append(Arm("SAGE (authors-dg)", "SAGE", authors, base=base))
    ablation = {k: v for k, v in SAGE_DEFAULTS.items() if k != "gamma"}
    arms.append(Arm("SAGE_CurvatureOnly", "SAGE_CurvatureOnly", ablation, base=base))
    arms.append(Arm("SAGE_AlignmentOnly", "SAGE_AlignmentOnly", {**SAGE_DEFAULTS, "rho": 0.0}, base=base))
    arms.append(Arm("SAGM", "SAGM", base=base))
    return arms


#: the arms of a cell's ``-core`` part, the primary comparison: ERM, SAM at its usual rho, SAGE at its
#: defaults and at the authors' DG values (labels of :func:`pt_arms`, and SAM's rho)
PT_CORE_ARMS: tuple[tuple[str, float | None], ...] = (
    ("ERM", None),
    ("SAGE (default)", None),
    ("SAGE (authors-dg)", None),
    ("SAM", 0.05),
)


def is_core(choice: Any) -> bool:
    """Whether ``choice`` (an :class:`~torchsage.study.spec.Arm`, or a run with the same ``method``
    and ``hparams``) is one of :data:`PT_CORE_ARMS`."""
    return any(
        choice.method == m and (rho is None or choice.hparams.get("rho") == rho) for m, rho in PT_CORE_ARMS
    )


def in_pt_cells(payload: dict[str, Any]) -> bool:
    """Whether a theory payload (``theory.json``, :mod:`torchsage.study.theory`) is of a run of
    :data:`PT_CELLS` (payloads without ``test_envs`` are not).

    Example:
        >>> in_pt_cells({"dataset": "EmojiStyles", "test_envs": [5]}), in_pt_cells({"dataset": "EmojiStyles"})
        (True, False)
    """
    return any((payload.get("dataset"), int(e)) in PT_CELLS for e in payload.get("test_envs", ()))


def pt_core_arms() -> list[Arm]:
    """The arms of :data:`PT_CORE_ARMS`, one choice per method (so nothing is selected among them).

    Example:
        >>> [(a.method, a.hparams.get("rho")) for a in pt_core_arms()][:2]
        [('ERM', None), ('SAM', 0.05)]
    """
    return [a for a in pt_arms() if is_core(a)]


#: the arms of a cell's ``-ablations`` part (labels of :func:`pt_arms`): SAGE's two halves at its
#: defaults, run before the grids so that the core comparison's SAGE result can be traced to one half
PT_ABLATION_ARMS: tuple[str, ...] = ("SAGE_CurvatureOnly", "SAGE_AlignmentOnly")


def pt_ablation_arms() -> list[Arm]:
    """The arms of :data:`PT_ABLATION_ARMS` (a subset part fixed on 4 December 2026, after the core
    comparison and before any ablation result was looked at: which half of SAGE makes its loss?).

    Example:
        >>> [a.method for a in pt_ablation_arms()]
        ['SAGE_CurvatureOnly', 'SAGE_AlignmentOnly']
    """
    return [a for a in pt_arms() if a.method in PT_ABLATION_ARMS]


def pt_head_arms() -> list[Arm]:
    """The classifier's ascent direction (a follow-up, fixed on 4 December 2026 before any of its
    runs): SAGE at its defaults with the classifier's matrix on SAM's direction (``"gradient"``) or
    not perturbed (``"none"``), against the core part's ERM and SAGE (default) runs of the same
    trials. It decides the default for output heads by accuracy; docs/benchmarks.md has the cost.

    Example:
        >>> [a.hparams["classifier_ascent"] for a in pt_head_arms()]
        ['gradient', 'none']
    """
    return [
        Arm(f"SAGE (classifier {d})", "SAGE", {**SAGE_DEFAULTS, "classifier_ascent": d}, base=PT_BASE_HPARAMS)
        for d in ("gradient", "none")
    ]


def pt_schedule_arms() -> list[Arm]:
    """The ascent schedules (a follow-up, fixed on 4 December 2026 before any of its runs): SAGE at
    its defaults with the ascent on every 5th step or when the disagreement is at least its running
    mean, the first study's schedules (:data:`~torchsage.study.spec.SCHEDULES`) but its every-step
    arm. That one is the core part's ``SAGE (default)`` run of the same trial, the same computation
    (the harness's ``ascent_every`` defaults to 1, every step), so it is not run again; the table
    sets each schedule's accuracy and step time against it and against ERM.

    Example:
        >>> [a.method for a in pt_schedule_arms()]
        ['SAGE every 5', 'SAGE trigger D']
    """
    return [
        Arm(method, "SAGE", {**SAGE_DEFAULTS, **h}, base=PT_BASE_HPARAMS)
        for method, h in SCHEDULES
        if h != {"ascent_every": 1}
    ]


#: the noise scales of the gamma follow-up (:func:`pt_gamma_arms`), below SAGE's default 1e-3
PT_GAMMAS: tuple[float, ...] = (1e-4, 1e-5)


def pt_gamma_arms() -> list[Arm]:
    """SAGE's noise scale when fine-tuning with Adam (a follow-up, fixed on 5 December 2026 before
    any of its runs): SAGE at its defaults with gamma 1e-4 and 1e-5 (:data:`PT_GAMMAS`), a tenth and
    a hundredth of the default's, read against the core part's ERM and ``SAGE (default)`` (gamma
    1e-3) and the ablations' ``SAGE_CurvatureOnly`` (no noise: gamma 0) of the same trials.

    Why: on this cell SAGE's loss against ERM is its noise (the ablations), and at the default's
    scale the noise's standard deviation is above almost every fine-tuned gradient coordinate,
    which Adam's per-coordinate normalisation turns into steps of about the learning rate
    (``benchmarks/gradient_scale.py``). The question is whether a smaller scale removes the loss
    and whether any scale above zero gains on ERM. Rule fixed with the arms: a fine-tuning preset
    or default is adopted only for a scale that beats ERM with its Holm-adjusted p below 0.05;
    otherwise the docs report the measured dependence on gamma and keep the default.

    Example:
        >>> [a.hparams["gamma"] for a in pt_gamma_arms()]
        [0.0001, 1e-05]
    """
    return [
        Arm(f"SAGE (gamma {label})", "SAGE", {**SAGE_DEFAULTS, "gamma": g}, base=PT_BASE_HPARAMS)
        for g, label in zip(PT_GAMMAS, ("1e-4", "1e-5"), strict=True)
    ]


def pt_jobs(
    root: str,
    cells: tuple[tuple[str, int], ...] = PT_CELLS,
    n_trials: int = N_TRIALS,
    core: bool = False,
    heads: bool = False,
    ablations: bool = False,
    schedules: bool = False,
    gamma: bool = False,
) -> list[HashedJob]:
    """The runs of the pretrained-regime study, trial by trial, in ``root/dg/<hash>``.

    ``core=True`` keeps the arms of :data:`PT_CORE_ARMS` only: the same runs (the same directories) as
    the whole study's, so a core part run first is part of the whole one, not a second copy.
    ``ablations=True`` keeps :func:`pt_ablation_arms`, also runs of the whole study. ``heads=True``,
    ``schedules=True`` and ``gamma=True``: the runs of :func:`pt_head_arms`, :func:`pt_schedule_arms`
    or :func:`pt_gamma_arms` instead (the follow-ups' own)."""
    if sum((core, heads, ablations, schedules, gamma)) > 1:
        raise ValueError("pt_jobs: choose at most one of core, heads, ablations, schedules and gamma")
    subsets = (
        (heads, pt_head_arms),
        (core, pt_core_arms),
        (ablations, pt_ablation_arms),
        (schedules, pt_schedule_arms),
        (gamma, pt_gamma_arms),
    )
    arms = next((make for chosen, make in subsets if chosen), pt_arms)()
    return dg_jobs(root, cells=cells, n_trials=n_trials, steps=PT_STEPS, arms=arms)


def _part(env: int) -> str:
    from torchsage.dg.datasets import environment_names

    return f"pt-{environment_names('EmojiStyles')[env]}"


#: the parts of this study: per cell, its core arms (``pt-<design>-core``) and all its arms; then the
#: classifier-direction follow-up, the ablations' subset, the schedules and the gamma follow-ups on the
#: first cell (``pt-<design>-heads``, ``-ablations``, ``-schedules``, ``-gamma``)
PT_PARTS: tuple[str, ...] = (
    *(p for _, env in PT_CELLS for p in (f"{_part(env)}-core", _part(env))),
    f"{_part(PT_CELLS[0][1])}-heads",
    f"{_part(PT_CELLS[0][1])}-ablations",
    f"{_part(PT_CELLS[0][1])}-schedules",
    f"{_part(PT_CELLS[0][1])}-gamma",
)

#: parts whose runs are runs of their cell's whole part (``plan`` counts them once)
SUBSET_SUFFIXES: tuple[str, ...] = ("-core", "-ablations")


def pt_part_jobs(root: str, part: str) -> list[HashedJob] | None:
    """The runs of ``part`` if it is one of :data:`PT_PARTS`, else ``None``."""
    for cell in PT_CELLS:
        if part == _part(cell[1]):
            return pt_jobs(root, cells=(cell,))
        if part == f"{_part(cell[1])}-core":
            return pt_jobs(root, cells=(cell,), core=True)
        if part == f"{_part(cell[1])}-heads" and part in PT_PARTS:
            return pt_jobs(root, cells=(cell,), heads=True)
        if part == f"{_part(cell[1])}-ablations" and part in PT_PARTS:
            return pt_jobs(root, cells=(cell,), ablations=True)
        if part == f"{_part(cell[1])}-schedules" and part in PT_PARTS:
            return pt_jobs(root, cells=(cell,), schedules=True)
        if part == f"{_part(cell[1])}-gamma" and part in PT_PARTS:
            return pt_jobs(root, cells=(cell,), gamma=True)
    return None
