"""Multi-task learning harness: base solvers, benchmarks, training runs, Delta-m% reports.

In multi-task learning the distributions of SAGE are the tasks. The optimizer takes a base solver
(a torchjd aggregator or scalarization) through ``solver=``; this package adds what is needed to
measure it:

* :mod:`torchsage.mtl.solvers`: the registry of base solvers by name (``make_solver``);
* :mod:`torchsage.mtl.data`, :mod:`torchsage.mtl.networks`, :mod:`torchsage.mtl.metrics`:
  MultiDigits, NYUv2 and Cityscapes, MultiLeNet and SegNet-MTAN, task metrics and Delta-m%;
* :mod:`torchsage.mtl.benchmarks`: the benchmark registry; :mod:`torchsage.mtl.args`: ``MTLArgs``;
* :mod:`torchsage.mtl.train`: one training run (``train``); :mod:`torchsage.mtl.checkpoint`: its
  ``model.pt``, written and read back for the diagnostics;
* :mod:`torchsage.mtl.sweep`: solvers x methods x seeds in hashed, resumable run directories;
* :mod:`torchsage.mtl.report`: tables and a figure over a directory of runs;
* :mod:`torchsage.mtl.toy`: the two-task toy problem.

Importing this package loads none of them (torchjd is an optional dependency); ``SOLVERS``,
``make_solver`` and ``MTLArgs`` are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SOLVERS", "MTLArgs", "make_solver"]

_LAZY = {
    "SOLVERS": "torchsage.mtl.solvers",
    "make_solver": "torchsage.mtl.solvers",
    "MTLArgs": "torchsage.mtl.args",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'torchsage.mtl' has no attribute {name!r}")
