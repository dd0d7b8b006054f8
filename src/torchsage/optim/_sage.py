"""SAGE (Spectral-Aware Gradient-Aligned Exploration) and its named variants."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from torchsage.disagreement import GradientStatistics, check_measure
from torchsage.optim._ascent import AlignedPolarAscent, PolarAscent, check_direction
from torchsage.optim._core import AscentRule, SharpnessAware, shares_options

__all__ = ["SAGE", "SAGEAlign", "SAGEAlignmentOnly", "SAGECurvatureOnly"]


@shares_options
class SAGE(SharpnessAware):
    r"""Spectral-Aware Gradient-Aligned Exploration for K training distributions.

    Each step:

    1. takes every distribution's gradient :math:`g_k` at the weights (one backward per loss,
       streamed into running statistics: memory does not grow with K) and their mean
       :math:`\bar g`;
    2. **curvature** (ascent): moves each weight matrix along the polar factor of its mean
       gradient, :math:`\mathrm{polar}(G) = U V^\top` for :math:`G = U S V^\top` (Newton-Schulz),
       each vector along :math:`g / \lVert g \rVert`, scaled by ``rho`` as ``rho_scaling`` says;
    3. takes the gradient of the mean loss at the perturbed weights, restores the weights exactly;
    4. **alignment** (descent): adds isotropic Gaussian noise of standard deviation
       :math:`\gamma D` to that gradient, :math:`D` the disagreement of the :math:`g_k`
       (``max_disagreement`` clips it), and lets the base optimizer step.

    Args:
        params: parameters or parameter groups; a group may set its own ``rho`` and ``gamma``.
        base_optimizer: a :class:`torch.optim.Optimizer` class, built with ``**base_kwargs``.
        rho: ascent radius.
        gamma: noise scale: the noise std is ``gamma * disagreement``. The noise is absolute (per
            coordinate), so its effect grows with the learning rate, momentum and parameter count;
            see docs/usage.md for the measurement behind the default.
        disagreement: ``"normalized_std"``, ``"cosine"``, ``"normalized_var"``, ``"raw_std"``
            or ``"raw_var"`` (see :mod:`torchsage.disagreement`).
        ns_steps, ns_coefficients: Newton-Schulz iterations and schedule (``"muon"`` or
            ``"polar_express"``).
        polar_method: ``"auto"`` (default: the Newton-Schulz polynomial, iterated on the small Gram
            matrix of a matrix at least twice as wide as tall, where that was measured faster, else
            on the matrix itself), ``"newton_schulz"``, ``"gram_newton_schulz"`` or ``"svd"``
            (exact, slow); see :func:`torchsage.polar_factor`.
        seed: seeds the noise generator, whose state is part of :meth:`state_dict`; ``None``
            takes ``torch.initial_seed()`` (the last ``torch.manual_seed``) without drawing from
            the global generator, so building SAGE does not shift the random numbers after it.
        rho_scaling: ``"global"`` (default: the whole perturbation has norm ``rho``, as in SAM),
            ``"layer"`` (``rho * polar(G)`` per matrix) or ``"weight"``
            (``rho * ||W||_F * polar(G)``, as the authors' code does).
        max_disagreement: clips the disagreement from above before it scales the noise.
        ns_dtype: precision of the Newton-Schulz iteration (``torch.bfloat16`` on accelerators;
            accuracy against float64 in docs/benchmarks.md).
        ns_compile: run the Newton-Schulz iterations through ``torch.compile`` (see
            docs/benchmarks.md for what it buys; matrices of equal shape are always batched).
        model, update_bn_on_perturbed, max_grad_norm, on_nonfinite, solver_update: see
            :class:`torchsage.optim.SharpnessAware`.
        solver: multi-task learning: a torchjd aggregator or scalarizer (or ``"mean"``) that
            forms the descent direction from the perturbed task losses; the ascent stays the polar
            factor of the mean task gradient and the noise follows the disagreement of the task
            gradients (see :class:`torchsage.optim.SharpnessAware`).
        disagreement_scope: with a solver, where the disagreement of the task gradients is
            measured: ``"shared"`` (default with a solver: the parameters two or more tasks
            reach) or ``"all"`` (every parameter, a task's gradient counting as zero on the other
            tasks' heads, as the authors' multi-task code measures it). Only with ``solver``:
            without one the statistics already cover every parameter.
        process_group, layout: data-parallel training over ``torch.distributed`` (see
            :class:`torchsage.optim.SharpnessAware` and docs/distributed.md); the noise seed is
            rank 0's, so every process draws the same noise.
        ascent: the ascent direction of every parameter group that does not set its own
            ``"ascent"`` key: ``"polar"`` (default, the paper's "polar factor of each layer's
            gradient matrix"; vectors along ``g / ||g||``), ``"gradient"`` (every tensor along
            ``g / ||g||``, SAM's direction per tensor) or ``"none"`` (not perturbed). A group
            such as ``{"params": model.embeddings.parameters(), "ascent": "gradient"}`` chooses
            its own; the choice is saved in :meth:`state_dict` with the groups (see
            docs/usage.md for what the choice costs and saves on a transformer).

    **The defaults are not the authors'.** Their public code scales ``rho`` per matrix by
    ``||W||_F`` (``rho_scaling="weight"``), uses the cosine disagreement with ``gamma = 1.0`` and
    SGD for domain generalization, and ``normalized_std`` over all parameters with
    ``gamma = 1e-4`` and Adam for multi-task learning; :func:`torchsage.preset` returns those
    configurations. The library's defaults are global ``rho`` scaling (the perturbation has SAM's
    norm ``rho``: a SAM ``rho`` transfers, while ``"weight"`` moves a typical network tens of
    times further at the same ``rho``), ``normalized_std`` (on the shared parameters with a
    solver), ``gamma = 1e-3`` and the base optimizer you pass. They come from the measurements in
    docs/usage.md, not from the paper, and the evidence study (docs/study.md: 10 paired trials on
    each of four embedded DG cells, and MultiDigits) kept them: no choice of its grid did better,
    and at these values SAGE was within a point or two of ERM and SAM everywhere, which also means
    it was not shown to help.

    Every option after ``rho`` is keyword-only (``gamma`` by position would be ambiguous with
    SAM's options). With ``rho=0`` and ``gamma=0`` a step is the base optimizer's step on the mean loss;
    ``gamma=0`` is the curvature-only ablation (:class:`SAGECurvatureOnly`) and ``rho=0`` the
    alignment-only one (:class:`SAGEAlignmentOnly`, one pass per step).

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = SAGE(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.01, lr=0.1, seed=0)
        >>> domains = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(3)]
        >>> def closure():
        ...     return [torch.nn.functional.cross_entropy(model(x), y) for x, y in domains]
        >>> info = opt.step(closure)
        >>> info.disagreement > 0, round(info.perturbation_norm, 6)
        (True, 0.05)
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        *,
        gamma: float = 1e-3,
        disagreement: str = "normalized_std",
        ns_steps: int = 5,
        ns_coefficients: Any = "muon",
        polar_method: str = "auto",
        seed: int | None = None,
        rho_scaling: str = "global",
        max_disagreement: float | None = None,
        ns_dtype: torch.dtype = torch.float32,
        ns_compile: bool = False,
        disagreement_scope: str | None = None,
        ascent: str = "polar",
        **options: Any,
    ) -> None:
        self.measure = check_measure(disagreement)
        check_direction(ascent)
        if disagreement_scope is not None:
            if disagreement_scope not in ("all", "shared"):
                raise ValueError(f"disagreement_scope must be 'all' or 'shared', got {disagreement_scope!r}")
            if options.get("solver") is None:
                raise ValueError(
                    f"disagreement_scope={disagreement_scope!r} needs a solver (it says which task "
                    "parameters the disagreement covers); without solver= the disagreement already "
                    "covers every parameter: pass solver=... or leave disagreement_scope out"
                )
            self.disagreement_scope = disagreement_scope
        if max_disagreement is not None and not max_disagreement > 0:
            raise ValueError(f"max_disagreement must be a positive number or None, got {max_disagreement}")
        if seed is None:  # reproducible under torch.manual_seed, without consuming a random draw
            seed = torch.initial_seed()
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.max_disagreement = max_disagreement
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._ascent_options = dict(
            scaling=rho_scaling,
            steps=ns_steps,
            coefficients=ns_coefficients,
            method=polar_method,
            dtype=ns_dtype,
            compile=ns_compile,
        )
        #: added to the seed of the noise generators (FSDP2: one stream per process)
        self._noise_stream = 0
        rule = self._make_ascent(**self._ascent_options)
        super().__init__(params, base_optimizer, rule, dict(rho=rho, gamma=gamma, ascent=ascent), **options)
        if self._parallel is not None:  # one noise stream for all replicas
            params = self._all_params()
            device = params[0].device if params else torch.device("cpu")
            self.seed = self._parallel.agree_seed(self.seed, device)

    group_options = ("rho", "gamma")
    supports_sharded_parameters = True

    def _sharded_ascent(self, group: Any) -> AscentRule:
        from torch.distributed import get_rank

        from torchsage.optim._sharded import ShardedPolarAscent

        # each process draws the noise of its own rows: independent streams, not copies
        self._noise_stream = 1_000_003 * get_rank(group)
        return ShardedPolarAscent(group, **self._ascent_options)

    measures = ("squared_grad_norm", "disagreement")

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_direction(group["ascent"])

    def _make_ascent(self, **kwargs: Any) -> AscentRule:
        return PolarAscent(**kwargs)

    # -- statistics and noise ----------------------------------------------------------------

    def _wants_statistics(self) -> bool:
        return True

    def _statistics(self, params: list[Tensor]) -> GradientStatistics:
        return GradientStatistics(
            params,
            cosine=self.ascent.cosine or self.measure == "cosine",
            elementwise=self.ascent.elementwise,
        )

    def _measure(self, stats: GradientStatistics | None) -> dict[str, float]:
        value = float(stats.disagreement(self.measure)) if stats is not None else 0.0
        if self.max_disagreement is not None:
            value = min(value, self.max_disagreement)
        return {"disagreement": value}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed + self._noise_stream)
        return self._generators[key]

    def _descent(
        self,
        groups: list[tuple[dict[str, Any], list[Tensor]]],
        measured: dict[str, float],
        clean: dict[Tensor, Tensor] | None,
    ) -> dict[str, float]:
        stds = [g["gamma"] * measured["disagreement"] for g, ps in groups if ps]
        for group, ps in groups:
            std = group["gamma"] * measured["disagreement"]
            if not ps or std == 0:
                continue
            # One draw per (device, dtype): fewer kernel launches than one per parameter.
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
            for p in ps:  # an FSDP2 shard gets noise on its own rows
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                buckets[(grad.device, grad.dtype)].append(grad)
            for (device, dtype), grads in buckets.items():
                total = sum(g.numel() for g in grads)
                noise = torch.randn(total, generator=self._generator(device), device=device, dtype=dtype)
                pieces = [n.view_as(g) for n, g in zip(noise.split([g.numel() for g in grads]), grads)]
                torch._foreach_add_(grads, pieces, alpha=std)
        return {"disagreement": measured["disagreement"], "noise_std": stds[0] if stds else 0.0}

    def _noise_generators_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generators": {k: g.get_state() for k, g in self._generators.items()}}

    def _load_noise_generators_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        seed, saved = state.get("seed"), state.get("generators", {})
        if isinstance(seed, bool) or not isinstance(seed, int) or not isinstance(saved, dict):
            raise ValueError(
                f"the state_dict's noise state is damaged (seed {seed!r}, generators {type(saved)})"
            )
        generators = {}
        for key, gen_state in saved.items():
            generators[key] = torch.Generator(device=torch.device(key))
            try:
                generators[key].set_state(gen_state)
            except (RuntimeError, TypeError) as error:
                first = str(error).strip().splitlines()[0]
                raise ValueError(
                    f"the state_dict's noise generator state for {key} is damaged ({first})"
                ) from None
        self.seed, self._generators = seed, generators  # set together, once every part loaded


class SAGECurvatureOnly(SAGE):
    """Ablation: SAGE's polar-factor ascent without the descent noise (``gamma = 0``)."""

    def __init__(
        self, params: Any, base_optimizer: Callable[..., Optimizer], rho: float = 0.05, **kwargs: Any
    ):
        if "gamma" in kwargs:
            raise ValueError("SAGECurvatureOnly fixes gamma = 0; use SAGE to set it")
        super().__init__(params, base_optimizer, rho=rho, gamma=0.0, **kwargs)


class SAGEAlignmentOnly(SAGE):
    """Ablation: SAGE's disagreement-scaled noise without the ascent (``rho = 0``, one pass)."""

    def __init__(
        self, params: Any, base_optimizer: Callable[..., Optimizer], *, gamma: float = 1e-3, **kwargs: Any
    ):
        if "rho" in kwargs:
            raise ValueError("SAGEAlignmentOnly fixes rho = 0; use SAGE to set it")
        super().__init__(params, base_optimizer, rho=0.0, gamma=gamma, **kwargs)


class SAGEAlign(SAGE):
    r"""SAGE "align" variant: an alignment-aware ascent and no descent noise.

    The perturbation direction of a matrix is
    :math:`(1 - \lambda)\,\mathrm{polar}(\bar g)
    + \lambda\,\mathrm{polar}(\sigma \odot \mathrm{sign}(\bar g))`,
    :math:`\sigma` the per-coordinate standard deviation of the :math:`g_k`, and
    :math:`\lambda = \mathrm{clamp}(\lambda_{max} (1 - \text{mean cosine}), 0, \lambda_{max})`.
    A vector's direction mixes :math:`g / \lVert g \rVert` with its normalised spread the same way,
    unless ``mix_vectors=False``: then vectors move along :math:`g / \lVert g \rVert` alone, as
    in the authors' align code.

    With a ``solver`` the statistics cover every parameter (``disagreement_scope="all"``, the
    default here and the only scope allowed: the spread of a head is that of its task's gradient
    against the other tasks' zeros); the ascent uses the mean task gradient, the descent the
    solver's direction at the perturbed weights.

    Args:
        lambda_max: the largest mixing weight.
        mix_vectors: mix the directions of 1-d parameters too (default) or keep ``g / ||g||``.
        Other arguments as :class:`SAGE` (no ``gamma``).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = SAGEAlign(model.parameters(), torch.optim.SGD, rho=0.05, mix_vectors=False, lr=0.1)
        >>> data = [(torch.randn(8, 4), torch.randn(8, 3)) for _ in range(2)]
        >>> info = opt.step(lambda: [torch.nn.functional.mse_loss(model(x), y) for x, y in data])
        >>> round(info.perturbation_norm, 6)
        0.05
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        *,
        lambda_max: float = 0.8,
        mix_vectors: bool = True,
        **kwargs: Any,
    ):
        if "gamma" in kwargs:
            raise ValueError("SAGEAlign adds no noise (gamma = 0); use SAGE for noise")
        if kwargs.get("solver") is not None:
            kwargs.setdefault("disagreement_scope", "all")
        self.lambda_max = lambda_max
        self.mix_vectors = mix_vectors
        super().__init__(params, base_optimizer, rho=rho, gamma=0.0, **kwargs)

    def _make_ascent(self, **kwargs: Any) -> AscentRule:
        return AlignedPolarAscent(lambda_max=self.lambda_max, mix_vectors=self.mix_vectors, **kwargs)

    def _sharded_ascent(self, group: Any) -> AscentRule:
        from torchsage.optim._sharded import ShardedAlignedAscent

        return ShardedAlignedAscent(
            group, lambda_max=self.lambda_max, mix_vectors=self.mix_vectors, **self._ascent_options
        )
