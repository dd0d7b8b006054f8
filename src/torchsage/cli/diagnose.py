"""``torchsage diagnose``: the two terms of a saved model on its distributions, or the sandbox.

``torchsage diagnose RUN_DIR_OR_MODEL_PT`` loads a model written by ``torchsage dg train
--save-model`` (:mod:`torchsage.dg.checkpoint`) or ``torchsage mtl train --save-model``
(:mod:`torchsage.mtl.checkpoint`, recognised by its ``benchmark`` key), draws one batch per
distribution (by default the ``in`` split of every training environment, the split the model was
trained on), runs :func:`torchsage.diagnostics.decompose`, prints the terms and writes
``diagnose.json`` and ``diagnose.png`` (cosine matrix, gradient norms, the terms).

``torchsage diagnose sandbox --output-dir DIR`` reproduces the sandbox tables and figures
(:func:`torchsage.diagnostics.sandbox.run_sandbox`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from torchsage.cli.common import add_device, add_no_progress, add_threads, non_negative_float, positive_int
from torchsage.files import safe_torch_load

__all__ = ["add_diagnose_command", "run_diagnose"]


class DiagnoseError(ValueError):
    """Bad input to ``torchsage diagnose`` (reported as one line, exit code 2)."""


def add_diagnose_command(sub: Any) -> None:
    """Adds ``diagnose`` to the ``torchsage`` subcommands."""
    add_arguments(
        sub.add_parser("diagnose", help="alignment and curvature terms of a saved model, or sandbox")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``torchsage diagnose``."""
    parser.add_argument(
        "target",
        help="a run directory or model.pt from `dg train --save-model` (or `mtl train`), or 'sandbox'",
    )
    parser.add_argument(
        "--output-dir",
        "--output",
        dest="output",
        default=None,
        help="output folder (default: the model's folder; sandbox_output for the sandbox)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="samples per distribution (default: 256 for DG models, the run's batch size for MTL models)",
    )
    parser.add_argument(
        "--envs", type=int, nargs="+", default=None, help="environments to use (default: the training ones)"
    )
    parser.add_argument("--split", choices=["in", "out"], default="in", help="which part of each environment")
    parser.add_argument("--data-dir", default=None, help="override the data folder recorded in the run")
    parser.add_argument(
        "--damping", type=non_negative_float, default=0.0, help="added to H_bar in the solves"
    )
    parser.add_argument(
        "--cg-tol", type=non_negative_float, default=1e-4, help="relative residual of the CG solves"
    )
    parser.add_argument("--cg-max-iter", type=positive_int, default=100, help="CG iterations per solve")
    parser.add_argument(
        "--hutchinson-samples", type=positive_int, default=20, help="probe vectors of the trace estimate"
    )
    parser.add_argument("--lanczos-steps", type=positive_int, default=20, help="Lanczos iterations")
    parser.add_argument("--top-k", type=positive_int, default=1, help="top Hessian eigenvalues reported")
    parser.add_argument(
        "--exact-limit", type=int, default=2000, help="full Hessian up to this many parameters"
    )
    add_device(parser, "model and the Hessian-vector products")
    add_threads(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds the probes and the drawn examples")
    parser.add_argument("--repeats", type=positive_int, default=2000, help="sandbox: Monte Carlo draws")
    parser.add_argument("--steps", type=positive_int, default=800, help="sandbox: training steps per method")
    parser.add_argument("--dim", type=positive_int, default=20, help="sandbox: number of parameters")
    add_no_progress(parser)


def _load_checkpoint(target: str) -> tuple[Path, dict[str, Any]]:
    path = Path(target)
    if path.is_dir():
        path = path / "model.pt"
        if not path.exists():
            raise DiagnoseError(f"{target} holds no model.pt: train with `torchsage dg train --save-model`")
    elif not path.exists():
        raise DiagnoseError(f"no such file or directory: {target}")
    checkpoint = safe_torch_load(path, what="model checkpoint")
    if not isinstance(checkpoint, dict):
        raise DiagnoseError(f"{path} is not a torchsage model checkpoint (a dict with a 'model' entry)")
    return path, checkpoint


def _load_mtl(
    path: Path, checkpoint: dict[str, Any], args: argparse.Namespace
) -> tuple[torch.nn.Module, list[Any], list[Any], list[str]]:
    from torchsage.mtl.checkpoint import load_for_diagnostics

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


def _diagnose_model(args: argparse.Namespace) -> int:
    import warnings

    from torchsage.diagnostics import decompose
    from torchsage.diagnostics.summary import plot_report, summary

    path, checkpoint = _load_checkpoint(args.target)
    if "benchmark" in checkpoint:
        model, batches, loss_fn, names = _load_mtl(path, checkpoint, args)
        batch_size = args.batch_size  # None: the run's
        kind: dict[str, Any] = {"kind": "mtl", "benchmark": checkpoint["benchmark"]}
    else:
        batch_size = 256 if args.batch_size is None else args.batch_size
        from torchsage.dg.checkpoint import load_dg_model

        try:
            model, batches, names = load_dg_model(
                checkpoint, batch_size, args.envs, args.split, args.data_dir
            )
        except ValueError as error:
            raise DiagnoseError(str(error)) from None
        loss_fn = torch.nn.functional.cross_entropy
        kind = {
            "kind": "dg",
            "dataset": checkpoint["args"].get("dataset"),
            "algorithm": checkpoint["args"].get("algorithm"),
            "test_envs": checkpoint["args"].get("test_envs"),
            "split": args.split,
        }
    from torchsage.cli.common import default_device

    try:
        device = torch.device(args.device or default_device())
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
    print(summary(report, names))
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


def run_diagnose(args: argparse.Namespace) -> int:
    """Runs ``torchsage diagnose``; returns the exit code (errors go to the command line's handler)."""
    if args.target == "sandbox":
        return _diagnose_sandbox(args)
    try:
        return _diagnose_model(args)
    except KeyError as error:  # a checkpoint that lacks an entry
        raise DiagnoseError(f"the checkpoint lacks {error}") from None
