"""``torchsage diagnose``: the two terms of a saved model on its distributions, or the sandbox.

``torchsage diagnose RUN_DIR_OR_MODEL_PT`` loads a model written by ``torchsage dg train
--save-model`` (or a multi-task checkpoint, recognised by its ``benchmark`` key), draws one batch
per distribution (by default the ``in`` split of every training environment, the split the model
was trained on), runs :func:`torchsage.diagnostics.decompose`, prints the terms and writes
``diagnose.json`` and ``diagnose.png`` (cosine matrix, gradient norms, the terms).

``torchsage diagnose sandbox --output DIR`` reproduces the sandbox tables and figures
(:func:`torchsage.diagnostics.sandbox.run_sandbox`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from torchsage._util import positive_int as _positive_int

__all__ = ["add_arguments", "load_dg_model", "run"]


class DiagnoseError(ValueError):
    """Bad input to ``torchsage diagnose`` (reported as one line, exit code 2)."""


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``torchsage diagnose``."""
    parser.add_argument(
        "target",
        help="a run directory or model.pt from `dg train --save-model` (or `mtl train`), or 'sandbox'",
    )
    parser.add_argument("--output", default=None, help="output folder (default: the model's folder)")
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="samples per distribution (default: 256 for DG models, the run's batch size for MTL models)",
    )
    parser.add_argument(
        "--envs", type=int, nargs="+", default=None, help="environments to use (default: the training ones)"
    )
    parser.add_argument("--split", choices=["in", "out"], default="in", help="which part of each environment")
    parser.add_argument("--data-dir", default=None, help="override the data folder recorded in the run")
    parser.add_argument(
        "--damping", type=_nonnegative_float, default=0.0, help="added to H_bar in the solves"
    )
    parser.add_argument("--cg-tol", type=float, default=1e-4)
    parser.add_argument("--cg-max-iter", type=_positive_int, default=100)
    parser.add_argument("--hutchinson-samples", type=_positive_int, default=20)
    parser.add_argument("--lanczos-steps", type=_positive_int, default=20)
    parser.add_argument("--top-k", type=_positive_int, default=1)
    parser.add_argument(
        "--exact-limit", type=int, default=2000, help="full Hessian up to this many parameters"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=_positive_int, default=2000, help="sandbox: Monte Carlo draws")
    parser.add_argument("--steps", type=_positive_int, default=800, help="sandbox: training steps per method")
    parser.add_argument("--dim", type=_positive_int, default=20, help="sandbox: number of parameters")
    parser.add_argument("--no-progress", action="store_true")


def _load_checkpoint(target: str) -> tuple[Path, dict[str, Any]]:
    path = Path(target)
    if path.is_dir():
        path = path / "model.pt"
        if not path.exists():
            raise DiagnoseError(f"{target} holds no model.pt: train with `torchsage dg train --save-model`")
    elif not path.exists():
        raise DiagnoseError(f"no such file or directory: {target}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means "not a torchsage checkpoint"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DiagnoseError(f"{path} is not a readable torch checkpoint ({first})") from None
    if not isinstance(checkpoint, dict):
        raise DiagnoseError(f"{path} is not a torchsage model checkpoint (a dict with a 'model' entry)")
    return path, checkpoint


def load_dg_model(
    checkpoint: dict[str, Any],
    batch_size: int,
    envs: list[int] | None = None,
    split: str = "in",
    data_dir: str | None = None,
) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """The network of a ``dg train --save-model`` checkpoint and one batch per environment.

    The environments are split into ``in`` / ``out`` exactly as in training (same holdout
    fraction and trial seed); the batch of an environment is the first ``batch_size`` samples of
    the chosen split (deterministic). Default environments: the training ones.
    """
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from torchsage.dg.datasets import get_dataset, seed_hash, split_environment
    from torchsage.dg.networks import classifier, featurizer

    missing = [
        k
        for k in ("args", "hparams", "input_shape", "num_classes", "env_names", "model")
        if k not in checkpoint
    ]
    if missing:
        raise DiagnoseError(
            f"the checkpoint lacks {', '.join(missing)}: not written by `dg train --save-model`"
        )
    args, hparams = checkpoint["args"], checkpoint["hparams"]
    names = list(checkpoint["env_names"])
    test_envs = list(args.get("test_envs", []))
    chosen = [i for i in range(len(names)) if i not in test_envs] if envs is None else list(envs)
    for i in chosen:
        if not 0 <= i < len(names):
            raise DiagnoseError(f"environment {i} out of range: the model's data set has 0..{len(names) - 1}")
    if len(set(chosen)) < 2:
        raise DiagnoseError(f"the terms need at least 2 distinct environments, got {chosen}")

    feat = featurizer(checkpoint["input_shape"], hparams)
    network = torch.nn.Sequential(
        feat, classifier(feat.n_outputs, int(checkpoint["num_classes"]), hparams["nonlinear_classifier"])
    )
    try:
        network.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise DiagnoseError(
            f"the saved weights do not fit the network its hparams describe: {error}"
        ) from None

    dataset = get_dataset(
        args["dataset"],
        data_dir if data_dir is not None else args.get("data_dir"),
        augment=False,
        image_size=int(hparams.get("image_size", 224)),
    )
    batches = []
    for i in chosen:
        part_in, part_out = split_environment(
            dataset.environments[i],
            float(args.get("holdout_fraction", 0.2)),
            seed_hash(args.get("trial_seed", 0), i),
        )
        part = part_in if split == "in" else part_out
        n = min(batch_size, len(part))
        if n == 0:
            raise DiagnoseError(f"environment {i} has no samples in its {split!r} split")
        head = Subset(part.dataset, part.indices[:n])
        if isinstance(part.dataset, TensorDataset):
            idx = torch.as_tensor(head.indices)
            x, y = (t[idx] for t in part.dataset.tensors)
        else:
            x, y = next(iter(DataLoader(head, batch_size=n, shuffle=False)))
        batches.append((x, y))
    return network, batches, [names[i] for i in chosen]


def _load_mtl(
    path: Path, checkpoint: dict[str, Any], args: argparse.Namespace
) -> tuple[torch.nn.Module, list[Any], list[Any], list[str]]:
    try:
        from torchsage.mtl.train import load_for_diagnostics
    except ImportError:
        raise DiagnoseError(
            f"{path} is a multi-task checkpoint, but this installation has no "
            "torchsage.mtl.train.load_for_diagnostics to load it"
        ) from None
    model, batches, loss_fns = load_for_diagnostics(
        path, n_batches=1, batch_size=args.batch_size, data_dir=args.data_dir, seed=args.seed
    )
    names = [str(t) for t in checkpoint.get("tasks", [])]
    if len(names) != len(batches):
        names = [f"task{k}" for k in range(len(batches))]
    return model, list(batches), list(loss_fns), names


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))
    os.replace(tmp, path)


def plot_report(report: Any, names: list[str], path: Path, title: str = "") -> None:
    """Cosine matrix heatmap, per-distribution gradient norms and the terms, as one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.1, 1, 1]})
    cos = report.cosine_matrix
    im = ax1.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
    ax1.set_xticks(range(len(names)))
    ax1.set_yticks(range(len(names)))
    ax1.set_xticklabels(names, rotation=45, fontsize=7)
    ax1.set_yticklabels(names, fontsize=7)
    for i, row in enumerate(cos):
        for j, value in enumerate(row):
            ax1.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax1, fraction=0.046)
    ax1.set_title("gradient cosines", fontsize=9)
    ax2.bar(range(len(names)), report.grad_norms, color="tab:gray")
    ax2.axhline(report.mean_grad_norm, color="k", ls="--", lw=0.8, label="|mean gradient|")
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=45, fontsize=7)
    ax2.set_title("per-distribution gradient norms", fontsize=9)
    ax2.legend(fontsize=7)
    ax3.axis("off")
    alignment = "nan (negative curvature)" if math.isnan(report.alignment) else f"{report.alignment:.4g}"
    lines = [
        f"alignment tr((H+{report.damping:g}I)^-1 Sigma_g) = {alignment}",
        f"   CG residual {report.alignment_residuals:.2g}",
        f"curvature tr(H) = {report.curvature_trace:.4g} ± {report.curvature_trace_stderr:.2g}",
        f"top eigenvalue(s) = {', '.join(f'{v:.4g}' for v in report.curvature_top)}",
        f"smallest (Ritz) eigenvalue = {report.curvature_min:.4g}",
        f"disagreement (normalized_std) = {report.disagreement.get('normalized_std', math.nan):.4g}",
        f"K = {report.K}, parameters = {report.num_params}",
        f"Hessian-vector products = {report.hessian_vector_products}",
    ]
    ax3.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=8, transform=ax3.transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def _summary(report: Any, names: list[str]) -> str:
    alignment = (
        "nan (negative curvature: raise --damping)"
        if math.isnan(report.alignment)
        else f"{report.alignment:.6g}"
    )
    lines = [
        f"distributions: {', '.join(names)} (K={report.K}, {report.num_params} parameters)",
        f"alignment term  tr((H_bar + {report.damping:g} I)^-1 Sigma_g) = {alignment}"
        f"  (largest CG residual {report.alignment_residuals:.2g})",
        f"curvature term  tr(H_bar) = {report.curvature_trace:.6g} ± {report.curvature_trace_stderr:.2g}"
        f"{' (exact)' if report.exact else ' (Hutchinson)'}",
        f"                top eigenvalue(s) = {', '.join(f'{v:.6g}' for v in report.curvature_top)}; "
        f"smallest {'eigenvalue' if report.exact else 'Ritz value'} = {report.curvature_min:.6g}",
        f"gradient norms  {', '.join(f'{v:.4g}' for v in report.grad_norms)}"
        f" (mean gradient {report.mean_grad_norm:.4g})",
        "disagreement    " + ", ".join(f"{k} {v:.4g}" for k, v in report.disagreement.items()),
    ]
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)


def _diagnose_model(args: argparse.Namespace) -> int:
    import warnings

    from torchsage.diagnostics import decompose

    path, checkpoint = _load_checkpoint(args.target)
    if "benchmark" in checkpoint:
        model, batches, loss_fn, names = _load_mtl(path, checkpoint, args)
        batch_size = args.batch_size  # None: the run's
        kind: dict[str, Any] = {"kind": "mtl", "benchmark": checkpoint["benchmark"]}
    else:
        batch_size = 256 if args.batch_size is None else args.batch_size
        model, batches, names = load_dg_model(checkpoint, batch_size, args.envs, args.split, args.data_dir)
        loss_fn = torch.nn.functional.cross_entropy
        kind = {
            "kind": "dg",
            "dataset": checkpoint["args"].get("dataset"),
            "algorithm": checkpoint["args"].get("algorithm"),
            "test_envs": checkpoint["args"].get("test_envs"),
            "split": args.split,
        }
    try:
        device = torch.device(args.device)
        model = model.to(device)
    except (RuntimeError, AssertionError) as error:
        raise DiagnoseError(f"device {args.device!r} is not usable: {error}") from None
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the report carries them; printed below
        report = decompose(
            model,
            loss_fn,
            batches,
            damping=args.damping,
            cg_tol=args.cg_tol,
            cg_max_iter=args.cg_max_iter,
            hutchinson_samples=args.hutchinson_samples,
            exact_limit=args.exact_limit,
            top_k=args.top_k,
            lanczos_steps=args.lanczos_steps,
            seed=args.seed,
            progress=not args.no_progress,
        )
    out = Path(args.output) if args.output is not None else path.parent
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "source": str(path),
        **kind,
        "distributions": names,
        "batch_size": batch_size,
        "settings": {
            k: getattr(args, k)
            for k in (
                "damping",
                "cg_tol",
                "cg_max_iter",
                "hutchinson_samples",
                "lanczos_steps",
                "top_k",
                "seed",
            )
        },
        "report": report.as_dict(),
    }
    _write_json(out / "diagnose.json", payload)
    title = f"{kind.get('algorithm', '')} on {kind.get('dataset', kind.get('benchmark', ''))}"
    plot_report(report, names, out / "diagnose.png", title=title)
    print(_summary(report, names))
    print(f"written: {out / 'diagnose.json'}, {out / 'diagnose.png'}")
    return 0


def _diagnose_sandbox(args: argparse.Namespace) -> int:
    from torchsage.diagnostics.sandbox import run_sandbox

    out = Path(args.output) if args.output is not None else Path("sandbox_output")
    paths = run_sandbox(
        out,
        repeats=max(args.repeats, 2),
        steps=max(args.steps, 2),
        dim=args.dim,
        progress=not args.no_progress,
    )
    print(paths["tables"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs ``torchsage diagnose``; bad input prints one line on stderr and returns 2."""
    try:
        if args.target == "sandbox":
            return _diagnose_sandbox(args)
        return _diagnose_model(args)
    except (ValueError, FileNotFoundError, ImportError, KeyError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"torchsage: error: {message}", file=sys.stderr)
        return 2
