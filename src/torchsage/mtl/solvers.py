"""Base multi-task solvers by name: torchjd aggregators and loss scalarizations.

A *solver* turns T task losses into one update of the shared parameters. Two families:

* **aggregators** (``upgrad``, ``mgda``, ``pcgrad``, ``cagrad``, ``imtlg``, ``nashmtl``,
  ``graddrop``, ``alignedmtl``, ``dualproj``) combine the Jacobian of the task losses with respect
  to the shared parameters (T rows) into one vector;
* **scalarizations** (``ls``, ``uw``, ``dwa``, ``rlw``, ``famo``) combine the task losses into one
  scalar loss that is then differentiated. ``ls`` is the mean of the task losses by default;
  ``make_solver("ls", T, reduction="sum")`` is their sum (the SAGE authors' multi-task code sums
  them: the same direction T times longer, which matters for the descent step with SGD, not with
  Adam's normalised step).

``stl`` (single-task learning: one model per task) is no solver object; the training harness
handles it (see :mod:`torchsage.mtl.train`) and lists it among :data:`SOLVER_NAMES`.

:func:`make_solver` builds the torchjd object that ``torchsage.SAGE(..., solver=...)`` and
``torchsage.SAM(..., solver=...)`` take. Some solvers carry state or need more from the caller;
:class:`SolverSpec` says which:

* ``stateful``: the object keeps state across steps (NashMTL's weights, UW's log-variances,
  DWA's loss history, FAMO's task logits); the optimizer resets it when it is built, so build a
  new optimizer (or call ``reset()``) to start over;
* ``needs_parameters`` (``uw``): the solver's own parameters must be given to the optimizer,
  e.g. ``SAGE([{"params": model.parameters()}, {"params": solver.parameters()}], ...)``;
* ``epoch_step`` (``dwa``): the caller runs ``solver.step()`` at the end of every epoch;
* ``self_updating`` (``famo``): the optimizer runs ``solver.update(...)`` after every step itself;
* ``random``: the solver draws from torch's global random generator (seed it for repeatability).

Example:
    >>> from torchsage.mtl.solvers import SOLVERS, make_solver
    >>> make_solver("cagrad", n_tasks=2)
    CAGrad(c=0.4, norm_eps=0.0001)
    >>> SOLVERS["uw"].needs_parameters, SOLVERS["dwa"].epoch_step
    (True, True)
    >>> make_solver("ls", n_tasks=3, reduction="sum")
    Sum()
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = ["SOLVERS", "SOLVER_NAMES", "STL", "SolverSpec", "canonical_solver", "make_solver", "solver_spec"]

#: the name of single-task learning (one model per task, handled by the training harness)
STL = "stl"

_INSTALL = 'pip install "torchsage[mtl]"'


@dataclass(frozen=True)
class SolverSpec:
    """How to build one base solver and what it asks of the caller.

    Calling the spec builds the solver: ``spec(n_tasks, **kwargs)``; ``kwargs`` override the
    defaults given here and go to the torchjd constructor.
    """

    name: str
    kind: Literal["aggregator", "scalarizer"]
    title: str  #: the name used in papers and tables
    module: str  #: torchjd module holding the class
    cls: str  #: class name in ``module``
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: the constructor argument that receives the number of tasks (None: not needed)
    n_tasks_arg: str | None = None
    #: an option that picks another class of ``module`` instead of ``cls`` (``ls``: ``reduction``)
    variant_arg: str | None = None
    #: the classes ``variant_arg`` may pick, by value; ``cls`` is the default's
    variants: Mapping[str, str] = field(default_factory=dict)
    stateful: bool = False
    needs_parameters: bool = False
    epoch_step: bool = False
    self_updating: bool = False
    random: bool = False

    def __call__(self, n_tasks: int, **kwargs: Any) -> Any:
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")
        try:
            module = importlib.import_module(self.module)
        except ImportError as error:
            raise ImportError(
                f"solver {self.name!r} ({self.title}) needs torchjd, which is not installed ({error}); "
                f"install it with: {_INSTALL}"
            ) from error
        options = dict(self.defaults)
        if self.n_tasks_arg is not None:
            options[self.n_tasks_arg] = n_tasks
        options.update(kwargs)
        cls = self.cls
        if self.variant_arg is not None and self.variant_arg in options:
            value = options.pop(self.variant_arg)
            if value not in self.variants:
                raise ValueError(
                    f"solver {self.name!r}: {self.variant_arg} must be one of {', '.join(self.variants)}, "
                    f"got {value!r}"
                )
            cls = self.variants[value]
        try:
            return getattr(module, cls)(**options)
        except ImportError as error:  # torchjd checks cvxpy / quadprog / ... at construction
            raise ImportError(
                f"solver {self.name!r} ({self.title}) needs packages that are not installed ({error}); "
                f"install them with: {_INSTALL}"
            ) from error
        except TypeError as error:
            raise ValueError(f"solver {self.name!r}: bad options {kwargs}: {error}") from error


_AGG = "torchjd.aggregation"
_SCAL = "torchjd.scalarization"

_SPECS = [
    SolverSpec("upgrad", "aggregator", "UPGrad", _AGG, "UPGrad"),
    SolverSpec("mgda", "aggregator", "MGDA", _AGG, "MGDA"),
    SolverSpec("pcgrad", "aggregator", "PCGrad", _AGG, "PCGrad", random=True),
    SolverSpec("cagrad", "aggregator", "CAGrad", _AGG, "CAGrad", defaults={"c": 0.4}),
    SolverSpec("imtlg", "aggregator", "IMTL-G", _AGG, "IMTLG"),
    SolverSpec("nashmtl", "aggregator", "Nash-MTL", _AGG, "NashMTL", n_tasks_arg="n_tasks", stateful=True),
    SolverSpec("graddrop", "aggregator", "GradDrop", _AGG, "GradDrop", random=True),
    SolverSpec("alignedmtl", "aggregator", "Aligned-MTL", _AGG, "AlignedMTL"),
    SolverSpec("dualproj", "aggregator", "DualProj", _AGG, "DualProj"),
    SolverSpec(
        "ls",
        "scalarizer",
        "LS",
        _SCAL,
        "Mean",
        variant_arg="reduction",
        variants={"mean": "Mean", "sum": "Sum"},
    ),
    SolverSpec(
        "uw", "scalarizer", "UW", _SCAL, "UW", n_tasks_arg="shape", stateful=True, needs_parameters=True
    ),
    SolverSpec(
        "dwa",
        "scalarizer",
        "DWA",
        _SCAL,
        "DWA",
        defaults={"temperature": 2.0},
        stateful=True,
        epoch_step=True,
    ),
    SolverSpec("rlw", "scalarizer", "RLW", _SCAL, "Random", random=True),
    SolverSpec(
        "famo", "scalarizer", "FAMO", _SCAL, "FAMO", n_tasks_arg="shape", stateful=True, self_updating=True
    ),
]

#: every base solver by name (``stl`` is not a solver object and is not here)
SOLVERS: Mapping[str, SolverSpec] = MappingProxyType({s.name: s for s in _SPECS})

#: every name the training harness accepts: the solvers, then ``stl``
SOLVER_NAMES: tuple[str, ...] = (*SOLVERS, STL)


def canonical_solver(name: str) -> str:
    """The registered name of a solver (or ``stl``), matched without regard to case and
    punctuation (``IMTL-G`` -> ``imtlg``, ``Nash-MTL`` -> ``nashmtl``); ValueError listing the
    known ones otherwise."""
    from torchsage.registry import resolve

    return resolve(name, SOLVER_NAMES, "solver")


def solver_spec(name: str) -> SolverSpec:
    """The spec of a registered solver (any case and punctuation); ``ValueError`` naming the known
    solvers otherwise."""
    key = canonical_solver(name)
    if key == STL:
        raise ValueError("'stl' trains one model per task and has no solver object (see torchsage.mtl.train)")
    if key not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: use one of {', '.join(SOLVER_NAMES)}")
    return SOLVERS[key]


def make_solver(name: str, n_tasks: int, **kwargs: Any) -> Any:
    """Builds the torchjd aggregator or scalarizer registered as ``name`` for ``n_tasks`` tasks.

    Raises:
        ValueError: unknown name (the message lists the known ones) or bad options.
        ImportError: torchjd or a solver's optional dependency (cvxpy, quadprog, ...) is missing;
            the message says ``pip install "torchsage[mtl]"``.
    """
    return solver_spec(name)(n_tasks, **kwargs)
