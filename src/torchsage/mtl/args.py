"""The arguments of one multi-task run (:class:`MTLArgs`), recorded in every result line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MTLArgs"]


@dataclass
class MTLArgs:
    """The arguments of one run (recorded in every result line under ``args``).

    ``None`` takes the benchmark's default (epochs, batch size, lr, width, rho, gamma).
    ``stl_dir`` is a folder holding finished ``stl`` runs of the same benchmark: their mean final
    metrics become the baseline of ``delta_m`` (MultiDigits).
    """

    benchmark: str
    solver: str
    output_dir: str
    sage: bool = False
    sam: bool = False
    rho: float | None = None
    gamma: float | None = None
    epochs: int | None = None
    seed: int = 0
    data_dir: str | None = None
    batch_size: int | None = None
    lr: float | None = None
    width: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    augment: bool = True
    stl_dir: str | None = None
    save_model: bool = False
    progress: bool = True
    solver_options: dict[str, Any] = field(default_factory=dict)
    #: "cpu", "cuda", "cuda:1", ...; None: "cuda" when available, else "cpu"
    device: str | None = None
    #: data loader worker processes (NYUv2 / Cityscapes)
    num_workers: int = 0
    #: ``"authors"``: SAGE with the authors' settings (implies ``sage``; see
    #: :mod:`torchsage.mtl.sage_settings`); None: the benchmark's and the library's defaults
    preset: str | None = None
    #: SAGE's ``rho_scaling``, ``disagreement`` and ``disagreement_scope`` (None: the default,
    #: or the preset's)
    rho_scaling: str | None = None
    disagreement: str | None = None
    disagreement_scope: str | None = None

    @property
    def method(self) -> str:
        """``"sage"`` (``sage`` or a preset), ``"sam"`` or ``"plain"``."""
        return "sage" if self.sage or self.preset is not None else "sam" if self.sam else "plain"
