"""The SAGE settings of one multi-task run: the harness's defaults, or the authors' (``--preset``).

Without a preset a ``--sage`` run uses the benchmark's ``rho`` and ``gamma`` and the library's
defaults (global rho scaling, ``normalized_std`` on the shared parameters, float32 Newton-Schulz).
``--preset authors`` takes :func:`torchsage.preset` ``"authors-mtl"`` (NYUv2 and, lacking their own,
MultiDigits) or ``"authors-mtl-cityscapes"``: Adam lr 1e-4, rho 5e-4 / 3e-3 times each matrix's
``||W||_F``, ``normalized_std`` over every parameter, gamma 1e-4, bfloat16 Newton-Schulz, plus the
base-solver details of the authors' fork: LS as the sum of the task losses, FAMO updated from the
perturbed losses with weight decay 0.01 (defaults of their code, not values the paper reports).
Any option given on the command line (``--lr``, ``--rho``, ``--gamma``, ``--rho-scaling``,
``--disagreement``, ``--disagreement-scope``) overrides the preset's value.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsage
from torchsage.disagreement import MEASURES
from torchsage.mtl.args import MTLArgs
from torchsage.optim import RHO_SCALINGS

__all__ = [
    "PRESETS",
    "SCOPES",
    "check_choices",
    "check_sage_settings",
    "optimizer_options",
    "sage_settings",
    "solver_options",
]

#: names of ``--preset``
PRESETS: tuple[str, ...] = ("authors",)
#: values of ``--disagreement-scope``
SCOPES: tuple[str, ...] = ("shared", "all")

_AUTHORS = {"nyuv2": "authors-mtl", "cityscapes": "authors-mtl-cityscapes", "multidigits": "authors-mtl"}
#: the base-solver options of the authors' fork, by solver
_AUTHORS_SOLVERS: dict[str, dict[str, Any]] = {"ls": {"reduction": "sum"}, "famo": {"weight_decay": 0.01}}


def check_choices(
    preset: str | None, rho_scaling: str | None, disagreement: str | None, scope: str | None
) -> list[tuple[str, str]]:
    """ValueError naming the option for an unknown value; returns the SAGE-only options given."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    given = []
    checks = (
        ("--rho-scaling", rho_scaling, RHO_SCALINGS),
        ("--disagreement", disagreement, MEASURES),
        ("--disagreement-scope", scope, SCOPES),
    )
    for flag, value, allowed in checks:
        if value is None:
            continue
        if value not in allowed:
            raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        given.append((flag, value))
    return given


def check_sage_settings(args: MTLArgs, solver: str, stl: str) -> None:
    """ValueError naming the option when a SAGE setting is unknown or cannot apply to the run."""
    given = check_choices(args.preset, args.rho_scaling, args.disagreement, args.disagreement_scope)
    if args.preset is not None and args.sam:
        raise ValueError("--preset authors configures SAGE: drop --sam")
    for flag, _ in given:
        if args.method != "sage":
            raise ValueError(f"{flag} is a SAGE option: add --sage (or --preset authors), or drop {flag}")
    if solver == stl and (args.preset is not None or args.disagreement_scope is not None):
        flag = "--preset" if args.preset is not None else "--disagreement-scope"
        raise ValueError(f"{flag} needs a multi-task solver: stl trains one model per task, without one")


def sage_settings(args: MTLArgs, benchmark: str, lr: float, rho: float, gamma: float) -> dict[str, Any]:
    """The run's lr, rho, gamma and SAGE options (JSON-ready values, recorded with the run)."""
    base: dict[str, Any] = {}
    if args.preset is not None:
        base = torchsage.preset(_AUTHORS[benchmark])
    return {
        "lr": args.lr if args.lr is not None else base.get("lr", lr),
        "rho": args.rho if args.rho is not None else base.get("rho", rho),
        "gamma": args.gamma if args.gamma is not None else base.get("gamma", gamma),
        "rho_scaling": args.rho_scaling or base.get("rho_scaling", "global"),
        "disagreement": args.disagreement or base.get("disagreement", "normalized_std"),
        "disagreement_scope": args.disagreement_scope or base.get("disagreement_scope"),
        "ns_dtype": str(base.get("ns_dtype", torch.float32)).removeprefix("torch."),
        "preset": args.preset,
    }


def optimizer_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAGE keyword arguments from the resolved settings (scope only with a solver)."""
    options = {
        "rho_scaling": cfg["rho_scaling"],
        "disagreement": cfg["disagreement"],
        "ns_dtype": getattr(torch, cfg["ns_dtype"]),
    }
    if cfg["disagreement_scope"] is not None:
        options["disagreement_scope"] = cfg["disagreement_scope"]
    if cfg["preset"] is not None and cfg["solver"] == "famo":
        options["solver_update"] = "perturbed"
    return options


def solver_options(args: MTLArgs, solver: str) -> dict[str, Any]:
    """The base solver's options: the authors' fork's with ``--preset``, then the run's own."""
    base = _AUTHORS_SOLVERS.get(solver, {}) if args.preset is not None else {}
    return {**base, **args.solver_options}
