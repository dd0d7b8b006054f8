"""An exactly solvable multi-distribution problem: linear regression with distribution shift.

Every distribution :math:`k` draws inputs :math:`x \\sim \\mathcal N(0, H)` (one input covariance for
all) and targets :math:`y = x^\\top w_k + \\varepsilon`; the distributions differ by their optimum
:math:`w_k`, drawn from a meta-distribution with mean :math:`m` and covariance :math:`C`. The
population loss of distribution :math:`k` is, up to the label noise,

.. math:: L_k(w) = \\tfrac12 (w - w_k)^\\top H (w - w_k),

so every :math:`L_k` has Hessian :math:`H = \\bar H` and gradient :math:`g_k = H (w - w_k)`, whence
:math:`d_k = g_k - \\bar g = -H (w_k - \\bar w)`, :math:`\\Sigma_g = H S H` with :math:`S` the
(1/K) covariance of the K training optima, and the **alignment term**

.. math:: A = \\operatorname{tr}(\\bar H^{-1} \\Sigma_g) = \\operatorname{tr}(H S),

the same at every :math:`w`. A held-out distribution's expected loss is
:math:`\\tfrac12 (w - m)^\\top H (w - m)` plus constants, minimised at :math:`m`, so the **excess
risk** of a trained solution :math:`w` on held-out distributions is exactly

.. math:: \\mathcal E(w) = \\tfrac12 (w - m)^\\top H (w - m).

Training on K distributions reaches :math:`\\bar w = \\frac1K\\sum_k w_k` (the minimiser of the mean
training loss) plus a fluctuation :math:`\\delta` (optimizer noise, weight noise) independent of
the draw, of covariance :math:`\\Sigma_\\delta`. Then, exactly,

.. math:: \\mathbb E\\,\\mathcal E = \\frac{\\operatorname{tr}(H C)}{2K}
    + \\tfrac12 \\operatorname{tr}(H \\Sigma_\\delta)
    = \\frac{\\mathbb E[A]}{2(K-1)} + \\tfrac12 \\operatorname{tr}(H \\Sigma_\\delta),

because :math:`\\mathbb E[S] = \\frac{K-1}{K} C`. With isotropic :math:`\\Sigma_\\delta = \\sigma^2 I`
the **curvature term** is :math:`\\frac{\\sigma^2}2 \\operatorname{tr}(\\bar H)`: the trace of the
mean Hessian (not inverted) weighted by the size of the weights' fluctuation; for a worst-case
fluctuation of norm :math:`\\rho` (SAM's view) it is :math:`\\frac{\\rho^2}2\\lambda_{\\max}(\\bar H)`.

The experiments here (:func:`prediction_experiment`, :func:`counterexample`,
:func:`method_experiment`, all run by :func:`run_sandbox` and ``torchsage diagnose sandbox``)
measure the excess risk by Monte Carlo, compare it with the two terms and with the closed form,
and check :func:`torchsage.diagnostics.decompose` against the closed-form terms.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchsage.diagnostics.sandbox_report import (
    counterexample_table,
    method_table,
    plot_counterexample,
    plot_prediction,
    prediction_table,
)
from torchsage.harness.progress import bar as tqdm
from torchsage.harness.records import atomic_write_text as _write_whole

__all__ = [
    "Sandbox",
    "alignment_term",
    "counterexample",
    "curvature_term",
    "method_experiment",
    "predicted_excess",
    "prediction_experiment",
    "regression_batches",
    "run_sandbox",
]

F64 = torch.float64


def _sqrt_psd(M: Tensor) -> Tensor:
    """Symmetric square root of a positive semi-definite matrix."""
    evals, evecs = torch.linalg.eigh(M)
    return (evecs * evals.clamp(min=0.0).sqrt()) @ evecs.T


def _random_rotation(d: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


@dataclass(frozen=True)
class Sandbox:
    """Linear regression with distribution shift (see the module docstring).

    Attributes:
        hessian: :math:`H`, the shared input covariance and Hessian, ``(d, d)`` symmetric positive
            definite (float64).
        meta_mean: :math:`m`, the mean of the distributions' optima ``(d,)``.
        meta_cov: :math:`C`, their covariance ``(d, d)``, positive semi-definite.
    """

    hessian: Tensor
    meta_mean: Tensor
    meta_cov: Tensor

    def __post_init__(self) -> None:
        H, m, C = self.hessian, self.meta_mean, self.meta_cov
        if H.ndim != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"hessian must be a square matrix, got shape {tuple(H.shape)}")
        d = H.shape[0]
        if m.shape != (d,) or C.shape != (d, d):
            raise ValueError(
                f"meta_mean must have shape ({d},) and meta_cov ({d}, {d}), "
                f"got {tuple(m.shape)} and {tuple(C.shape)}"
            )
        for name, M, strict in (("hessian", H, True), ("meta_cov", C, False)):
            if not torch.allclose(M, M.T):
                raise ValueError(f"{name} must be symmetric")
            smallest = float(torch.linalg.eigvalsh(M.to(F64))[0])
            if smallest <= 0 if strict else smallest < -1e-12 * max(float(M.abs().max()), 1.0):
                kind = "positive definite" if strict else "positive semi-definite"
                raise ValueError(f"{name} must be {kind}; its smallest eigenvalue is {smallest:.3g}")

    @classmethod
    def build(
        cls,
        hessian_eigenvalues: Sequence[float] | Tensor,
        meta_scale: float = 1.0,
        hessian_scale: float = 1.0,
        rotate: bool = True,
        seed: int = 0,
    ) -> Sandbox:
        """:math:`H = t\\,Q \\operatorname{diag}(\\lambda) Q^\\top` (``t = hessian_scale``, ``Q`` a random
        rotation when ``rotate``), :math:`m = 0` and :math:`C = c I` (``c = meta_scale``)."""
        lam = torch.as_tensor(hessian_eigenvalues, dtype=F64)
        if lam.ndim != 1 or len(lam) < 1 or not bool((lam > 0).all()):
            raise ValueError("hessian_eigenvalues must be a non-empty list of positive numbers")
        if not (meta_scale >= 0 and hessian_scale > 0):
            raise ValueError(
                f"meta_scale must be >= 0 and hessian_scale > 0, got {meta_scale} and {hessian_scale}"
            )
        d = len(lam)
        Q = _random_rotation(d, torch.Generator().manual_seed(seed)) if rotate else torch.eye(d, dtype=F64)
        H = hessian_scale * (Q * lam) @ Q.T
        return cls((H + H.T) / 2, torch.zeros(d, dtype=F64), meta_scale * torch.eye(d, dtype=F64))

    @property
    def dim(self) -> int:
        return self.hessian.shape[0]

    def draw_optima(self, K: int, generator: torch.Generator) -> Tensor:
        """K optima :math:`w_k \\sim \\mathcal N(m, C)`, shape ``(K, d)``."""
        z = torch.randn(K, self.dim, generator=generator, dtype=F64)
        return self.meta_mean + z @ _sqrt_psd(self.meta_cov)

    def excess_risk(self, w: Tensor) -> Tensor:
        """:math:`\\tfrac12 (w - m)^\\top H (w - m)`, the expected excess loss on a held-out
        distribution; ``w`` may carry leading batch dimensions."""
        e = w.to(F64) - self.meta_mean
        return 0.5 * torch.einsum("...i,ij,...j->...", e, self.hessian, e)

    def expected_excess(self, K: int, sigma2: float) -> float:
        """Closed form of :math:`\\mathbb E\\,\\mathcal E(\\bar w + \\delta)`,
        :math:`\\delta \\sim \\mathcal N(0, \\sigma^2 I)`: :math:`\\operatorname{tr}(HC)/(2K)
        + \\sigma^2 \\operatorname{tr}(H)/2`."""
        return float(torch.trace(self.hessian @ self.meta_cov)) / (2 * K) + curvature_term(
            self.hessian, sigma2
        )

    def expected_alignment(self, K: int) -> float:
        """:math:`\\mathbb E[A] = \\frac{K-1}{K}\\operatorname{tr}(HC)`."""
        return (K - 1) / K * float(torch.trace(self.hessian @ self.meta_cov))


def alignment_term(hessian: Tensor, optima: Tensor) -> float:
    """:math:`\\operatorname{tr}(H^{-1}\\Sigma_g) = \\operatorname{tr}(H S)` for the shared-Hessian
    sandbox, :math:`S = \\frac1K \\sum_k (w_k - \\bar w)(w_k - \\bar w)^\\top`; independent of the
    point where the gradients are taken."""
    dev = optima.to(F64) - optima.to(F64).mean(0)
    return float(torch.einsum("ki,ij,kj->", dev, hessian.to(F64), dev)) / len(optima)


def curvature_term(hessian: Tensor, sigma2: float) -> float:
    """:math:`\\frac{\\sigma^2}2 \\operatorname{tr}(\\bar H)`: the expected loss increase from an
    isotropic weight fluctuation of variance :math:`\\sigma^2` per coordinate."""
    return 0.5 * sigma2 * float(torch.trace(hessian.to(F64)))


def predicted_excess(alignment: float, K: int, hessian: Tensor, sigma2: float) -> float:
    """:math:`\\frac{A}{2(K-1)} + \\frac{\\sigma^2}2\\operatorname{tr}(\\bar H)` (unbiased for the
    held-out excess risk of the sandbox; needs ``K >= 2``)."""
    if K < 2:
        raise ValueError(f"the alignment term needs at least 2 distributions, got K={K}")
    return alignment / (2 * (K - 1)) + curvature_term(hessian, sigma2)


class _Weights(nn.Module):
    """A linear model ``x -> x w`` whose weight vector is the sandbox's :math:`w`."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.detach().clone().to(F64))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w


def half_mse(output: Tensor, target: Tensor) -> Tensor:
    """:math:`\\frac1{2n}\\lVert \\text{output} - \\text{target} \\rVert^2`."""
    return 0.5 * (output - target).square().mean()


def regression_batches(
    sandbox: Sandbox, optima: Tensor, w: Tensor
) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor], list[tuple[Tensor, Tensor]]]:
    """A model at ``w``, a loss and one batch per distribution whose losses are exactly the
    population losses :math:`L_k` (without label noise), for :func:`~torchsage.diagnostics.decompose`.

    The inputs are the d rows of :math:`\\sqrt d\\,H^{1/2}` (so :math:`X^\\top X / d = H`) and the
    targets :math:`X w_k`.
    """
    X = math.sqrt(sandbox.dim) * _sqrt_psd(sandbox.hessian)
    batches = [(X, X @ wk) for wk in optima.to(F64)]
    return _Weights(w), half_mse, batches


# --- experiments -----------------------------------------------------------------------------------


def _decaying(d: int, low: float) -> list[float]:
    return torch.logspace(0.0, math.log10(low), d, dtype=F64).tolist()


def _monte_carlo(
    sandbox: Sandbox, K: int, sigma2: float, repeats: int, generator: torch.Generator
) -> dict[str, float]:
    """Draws ``repeats`` training sets and fluctuations; measured excess and alignment (mean, stderr)."""
    d = sandbox.dim
    optima = sandbox.meta_mean + torch.randn(repeats, K, d, generator=generator, dtype=F64) @ _sqrt_psd(
        sandbox.meta_cov
    )
    w = optima.mean(1) + math.sqrt(sigma2) * torch.randn(repeats, d, generator=generator, dtype=F64)
    e = sandbox.excess_risk(w)
    dev = optima - optima.mean(1, keepdim=True)
    a = torch.einsum("rki,ij,rkj->r", dev, sandbox.hessian, dev) / K
    return {
        "measured_excess": float(e.mean()),
        "measured_excess_stderr": float(e.std() / math.sqrt(repeats)),
        "alignment": float(a.mean()),
    }


def _check_decompose(sandbox: Sandbox, K: int, generator: torch.Generator, seed: int) -> dict[str, float]:
    """decompose() (CG, Hutchinson, Lanczos: no dense Hessian) against the closed forms at a point."""
    from torchsage.diagnostics import decompose

    optima = sandbox.draw_optima(K, generator)
    w = optima.mean(0) + 0.1 * torch.randn(sandbox.dim, generator=generator, dtype=F64)
    model, loss_fn, batches = regression_batches(sandbox, optima, w)
    report = decompose(
        model,
        loss_fn,
        batches,
        exact=False,
        cg_tol=1e-10,
        hutchinson_samples=50,
        lanczos_steps=sandbox.dim,
        seed=seed,
        progress=False,
    )
    exact_alignment = alignment_term(sandbox.hessian, optima)
    evals = torch.linalg.eigvalsh(sandbox.hessian)
    return {
        "alignment_closed_form": exact_alignment,
        "alignment_decompose": report.alignment,
        "alignment_rel_error": abs(report.alignment - exact_alignment) / exact_alignment,
        "trace_closed_form": float(evals.sum()),
        "trace_hutchinson": report.curvature_trace,
        "trace_stderr": report.curvature_trace_stderr,
        "top_closed_form": float(evals[-1]),
        "top_lanczos": report.curvature_top[0],
    }


def prediction_experiment(
    K: int = 5,
    dim: int = 20,
    meta_scales: Sequence[float] = (1e-3, 1e-2, 1e-1),
    sigma2s: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2),
    spectra: Sequence[str] = ("flat", "decaying"),
    repeats: int = 400,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """How well the two terms predict the held-out excess risk as their sizes vary.

    For every spectrum of :math:`H` (``flat``: all eigenvalues 1; ``decaying``: 1 down to 1e-2,
    log-spaced), meta-covariance :math:`C = cI` (``meta_scales``) and fluctuation variance
    :math:`\\sigma^2` (``sigma2s``), ``repeats`` draws of K training optima and of the fluctuation
    give the measured excess risk (mean and standard error) and the mean alignment term; the row
    holds the two terms, their prediction :math:`A/(2(K-1)) + \\sigma^2\\operatorname{tr}H/2`, the
    closed form and, once per (spectrum, C), a decompose() check on one draw (else ``None``).
    """
    if K < 2:
        raise ValueError(f"K must be at least 2, got {K}")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    grid = [(s, c, v) for s in spectra for c in meta_scales for v in sigma2s]
    for spectrum, c, sigma2 in tqdm(grid, desc="sandbox: prediction", disable=not progress, leave=False):
        if spectrum not in ("flat", "decaying"):
            raise ValueError(f"unknown spectrum {spectrum!r}: use 'flat' or 'decaying'")
        lam = [1.0] * dim if spectrum == "flat" else _decaying(dim, 1e-2)
        box = Sandbox.build(lam, meta_scale=c, seed=seed)
        mc = _monte_carlo(box, K, sigma2, repeats, gen)
        curv = curvature_term(box.hessian, sigma2)
        align_part = mc["alignment"] / (2 * (K - 1))
        row = {
            "spectrum": spectrum,
            "meta_scale": c,
            "sigma2": sigma2,
            "K": K,
            "alignment": mc["alignment"],
            "alignment_part": align_part,
            "curvature_trace": float(torch.trace(box.hessian)),
            "curvature_part": curv,
            "predicted_excess": align_part + curv,
            "closed_form_excess": box.expected_excess(K, sigma2),
            "measured_excess": mc["measured_excess"],
            "measured_excess_stderr": mc["measured_excess_stderr"],
        }
        # decompose() depends on H and C only: checked once per (spectrum, C)
        row["decompose_check"] = _check_decompose(box, K, gen, seed) if sigma2 == sigma2s[0] else None
        rows.append(row)
    return rows


def counterexample(
    K: int = 5,
    dim: int = 20,
    sigma2: float = 1e-3,
    repeats: int = 400,
    scales: Sequence[float] = tuple(10.0 ** (i / 4) for i in range(-8, 9)),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Neither term bounds the other, with measured excess risks.

    ``pairs``: four configurations on the decaying spectrum :math:`H_0` (1 to 0.1) at a fixed
    fluctuation :math:`\\sigma^2`:

    * *equal curvature*: the same :math:`H = H_0` (so the same :math:`\\operatorname{tr}\\bar H`
      and curvature term) with :math:`C = 10^{-3} I` and :math:`C = 10^{-1} I`: alignment terms
      100 times apart;
    * *equal alignment*: :math:`H = t H_0`, :math:`C = (10^{-2}/t) I` with :math:`t = 0.1` and
      :math:`t = 10` (the same :math:`\\operatorname{tr}(HC)`, hence the same expected alignment):
      curvature terms 100 times apart.

    ``sweep``: at a fixed gradient covariance (:math:`\\mathbb E\\Sigma_g` held constant:
    :math:`H = t H_0`, :math:`C = 10^{-2} I / t^2`), the Hessian scale ``t`` runs over ``scales``:
    the alignment term falls as :math:`1/t` while the curvature term grows as :math:`t`, so
    flattening alone (small ``t``) raises the excess risk.
    """
    gen = torch.Generator().manual_seed(seed)
    lam = _decaying(dim, 1e-1)

    def measure(name: str, box: Sandbox) -> dict[str, Any]:
        mc = _monte_carlo(box, K, sigma2, repeats, gen)
        return {
            "config": name,
            "hessian_trace": float(torch.trace(box.hessian)),
            "meta_scale": float(box.meta_cov[0, 0]),
            "expected_alignment": box.expected_alignment(K),
            "alignment": mc["alignment"],
            "alignment_part": mc["alignment"] / (2 * (K - 1)),
            "curvature_part": curvature_term(box.hessian, sigma2),
            "closed_form_excess": box.expected_excess(K, sigma2),
            "measured_excess": mc["measured_excess"],
            "measured_excess_stderr": mc["measured_excess_stderr"],
        }

    configs = [
        ("equal curvature, low alignment", Sandbox.build(lam, meta_scale=1e-3, seed=seed)),
        ("equal curvature, high alignment", Sandbox.build(lam, meta_scale=1e-1, seed=seed)),
        ("equal alignment, low curvature", Sandbox.build(lam, 1e-2 / 0.1, hessian_scale=0.1, seed=seed)),
        ("equal alignment, high curvature", Sandbox.build(lam, 1e-2 / 10.0, hessian_scale=10.0, seed=seed)),
    ]
    pairs = [measure(name, box) for name, box in tqdm(configs, desc="sandbox: pairs", disable=not progress)]
    sweep = []
    for t in tqdm(scales, desc="sandbox: sweep", disable=not progress, leave=False):
        row = measure(f"t={t:.3g}", Sandbox.build(lam, meta_scale=1e-2 / t**2, hessian_scale=t, seed=seed))
        row["hessian_scale"] = t
        sweep.append(row)
    return {"K": K, "sigma2": sigma2, "repeats": repeats, "pairs": pairs, "sweep": sweep}


def method_experiment(
    K: int = 4,
    dim: int = 20,
    meta_scale: float = 1e-2,
    label_noise: float = 0.5,
    batch_size: int = 8,
    lr: float = 0.5,
    steps: int = 800,
    rho: float = 0.05,
    gamma: float = 1e-3,
    seeds: Sequence[int] = (0, 1),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """ERM (plain SGD), SAM, SAGE's alignment-only ablation and SAGE trained on the sandbox.

    Every step draws ``batch_size`` fresh samples per training distribution (minibatch noise
    whose covariance is proportional to :math:`H`, as in real networks). Over the second half of
    training the rows average the held-out excess risk :math:`\\mathcal E(w_t)`, its alignment
    part :math:`\\mathcal E(\\bar w)` (the minimiser of the mean training loss, the same for every
    method) and the curvature part :math:`\\tfrac12 (w_t - \\bar w)^\\top H (w_t - \\bar w)` paid for
    the fluctuation; ``alignment`` and ``curvature_trace`` are decompose()'s terms at the last
    iterate (on the population losses, from the dense Hessian). The row
    ``SAGE_AlignmentOnly (30x gamma)`` shows what the descent noise itself does.
    """
    import torchsage
    from torchsage.diagnostics import decompose

    makers: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
        "ERM": lambda p: torch.optim.SGD(p, lr=lr),
        "SAM": lambda p: torchsage.SAM(p, torch.optim.SGD, rho=rho, lr=lr),
        "SAGE_AlignmentOnly": lambda p: torchsage.SAGEAlignmentOnly(
            p, torch.optim.SGD, gamma=gamma, lr=lr, seed=0
        ),
        "SAGE": lambda p: torchsage.SAGE(p, torch.optim.SGD, rho=rho, gamma=gamma, lr=lr, seed=0),
        # the default noise is too small to matter here; 30x shows what the noise itself does
        "SAGE_AlignmentOnly (30x gamma)": lambda p: torchsage.SAGEAlignmentOnly(
            p, torch.optim.SGD, gamma=30 * gamma, lr=lr, seed=0
        ),
    }
    box = Sandbox.build(_decaying(dim, 1e-1), meta_scale=meta_scale, seed=0)
    root_h = _sqrt_psd(box.hessian)
    rows = []
    jobs = [(name, s) for s in seeds for name in makers]
    for name, seed in tqdm(jobs, desc="sandbox: methods", disable=not progress):
        gen = torch.Generator().manual_seed(1000 + seed)
        optima = box.draw_optima(K, gen)
        w_bar = optima.mean(0)
        model = _Weights(torch.randn(dim, generator=gen, dtype=F64))
        opt = makers[name](list(model.parameters()))
        totals = {"excess": 0.0, "curvature_part": 0.0, "noise_std": 0.0}
        counted = 0
        for step in range(steps):
            batches = []
            for k in range(K):
                x = torch.randn(batch_size, dim, generator=gen, dtype=F64) @ root_h
                y = x @ optima[k] + label_noise * torch.randn(batch_size, generator=gen, dtype=F64)
                batches.append((x, y))

            def closure(
                batches: list[tuple[Tensor, Tensor]] = batches, model: nn.Module = model
            ) -> list[Tensor]:
                return [half_mse(model(x), y) for x, y in batches]

            if name == "ERM":
                opt.zero_grad()
                torch.stack(closure()).mean().backward()
                opt.step()
            else:
                info = opt.step(closure)
                if step >= steps // 2 and math.isfinite(info.noise_std):
                    totals["noise_std"] += info.noise_std
            if step >= steps // 2:
                w = model.w.detach()
                totals["excess"] += float(box.excess_risk(w))
                totals["curvature_part"] += float(box.excess_risk(w - w_bar + box.meta_mean))
                counted += 1
        model_at, loss_fn, batches = regression_batches(box, optima, model.w.detach())
        report = decompose(model_at, loss_fn, batches, exact=True, progress=False)
        rows.append(
            {
                "method": name,
                "seed": seed,
                "excess": totals["excess"] / counted,
                "alignment_part": float(box.excess_risk(w_bar)),
                "curvature_part": totals["curvature_part"] / counted,
                "noise_std": totals["noise_std"] / counted,
                "alignment": report.alignment,
                "curvature_trace": report.curvature_trace,
                "curvature_top": report.curvature_top[0],
            }
        )
    return rows


def run_sandbox(
    output_dir: str | os.PathLike[str],
    repeats: int = 2000,
    steps: int = 800,
    dim: int = 20,
    progress: bool = True,
) -> dict[str, Path]:
    """Runs the three experiments (``dim`` parameters) and writes ``sandbox.json``, ``sandbox.md``,
    ``theory_sandbox.png`` and ``theory_counterexample.png`` (each file written whole)."""
    if repeats < 2 or steps < 2 or dim < 1:
        raise ValueError(
            f"repeats and steps must be at least 2 and dim at least 1, got {repeats}, {steps}, {dim}"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        prediction = prediction_experiment(dim=dim, repeats=repeats, progress=progress)
        counter = counterexample(dim=dim, repeats=repeats, progress=progress)
        methods = method_experiment(dim=dim, steps=steps, progress=progress)
    finally:
        torch.set_num_threads(torch_threads)
    paths = {
        "json": out / "sandbox.json",
        "tables": out / "sandbox.md",
        "prediction_png": out / "theory_sandbox.png",
        "counterexample_png": out / "theory_counterexample.png",
    }
    _write_whole(
        paths["json"],
        json.dumps({"prediction": prediction, "counterexample": counter, "methods": methods}, indent=1),
    )
    _write_whole(
        paths["tables"],
        "## Prediction of the held-out excess risk\n\n"
        + prediction_table(prediction)
        + "\n\n## Counterexample\n\n"
        + counterexample_table(counter)
        + "\n\n## Methods on the sandbox\n\n"
        + method_table(methods)
        + "\n",
    )
    plot_prediction(prediction, paths["prediction_png"])
    plot_counterexample(counter, paths["counterexample_png"])
    return paths
