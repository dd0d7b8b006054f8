"""Step time of SAM and SAGE on the shapes people fine-tune: ResNet-50, BERT-base, ViT-S.

Each model (``_finetune_models.py``: ResNet-50 in plain torch, BERT-base and ViT-S shaped
``transformers`` encoders, random init) gets K distributions of random batches. In every round, in
rotated order (so drift in the machine's speed hits all alike), one step of each of:

* ``SAM``: two passes (SGD, lr 1e-3, rho 0.05);
* ``SAGE``: two passes and the polar factors (its defaults: ``polar_method="auto"``, zero rows and
  columns dropped);
* ``SAM 1-pass`` and ``SAGE 1-pass``: the steps an ascent schedule skips (``EveryK`` at a step
  that is not a multiple of k): one pass, and SAGE's per-distribution gradients and noise;
* the Newton-Schulz polar factors of the model's gradient matrices, grouped by shape as SAGE's
  ascent stacks them, timed per group: ``plain`` is the iteration before this change (on the matrix
  itself, nothing dropped), ``now`` is SAGE's default.

Reported: medians over rounds; SAGE/SAM; the Newton-Schulz share of the SAGE step; per-shape
times; the mean step of ``EveryK(k)`` from the measured two-pass and one-pass steps,
``(T_2 + (k - 1) T_1) / k``, for SAGE and for SAM with the same schedule.

CPU runs use small batches; the tables also give a **projection** to the batch of the targets
(ResNet-50 32 images per distribution, BERT-base 32 sequences of 128 tokens): the two-pass time
scaled in proportion to the examples (a pass is linear in the batch), SAGE's extra time (the polar
factors and the per-distribution statistics, which do not grow with the batch) kept, except the
embeddings' polar factors, which are re-timed on the rows a target-sized batch of random tokens
touches.

    python benchmarks/finetune_step.py --threads 1                        # about 10-20 minutes
    python benchmarks/finetune_step.py --models resnet50 --batch 2 --rounds 2
    python benchmarks/finetune_step.py --quick                            # smoke run (small widths)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _finetune_models as fm
import torchsage
from torchsage import polar
from torchsage.optim import EveryK

#: the batch per distribution of the targets (examples) and what the CPU run uses by default
TARGET_BATCH = {"resnet50": 32, "bert-base": 32, "vit-s": 32}
CPU_BATCH = {"resnet50": 2, "bert-base": 2, "vit-s": 2}
NEVER = 10**9  # EveryK(NEVER) past step 0: every step is one pass


@contextlib.contextmanager
def uncompacted() -> Iterator[None]:
    """The polar factor as before zero rows and columns were dropped (for the ``plain`` column)."""
    saved = polar._nonzero_lines
    polar._nonzero_lines = lambda G: None
    try:
        yield
    finally:
        polar._nonzero_lines = saved


Key = tuple[int, int, bool]


def groups_by_shape(model: torch.nn.Module, batches, loss) -> dict[Key, list[torch.Tensor]]:
    """The model's mean gradient matrices, reshaped to (out, -1) and grouped by shape as SAGE stacks
    them; embeddings apart (key ``(rows, cols, is_embedding)``), so their cost can be read alone."""
    model = copy.deepcopy(model)
    embeddings = {id(p) for p in fm.embedding_parameters(model)}
    torch.stack([loss(model, b) for b in batches]).mean().backward()
    groups: dict[Key, list[torch.Tensor]] = defaultdict(list)
    for p in model.parameters():
        if p.grad is not None and p.ndim >= 2:
            key = (p.shape[0], p[0].numel(), id(p) in embeddings)
            groups[key].append(p.grad.reshape(p.shape[0], -1).detach().clone())
    return groups


def ns_call(mats: list[torch.Tensor], method: str, compact: bool) -> Callable[[], object]:
    stacked = mats[0] if len(mats) == 1 else torch.stack(mats)

    def run() -> object:
        with contextlib.nullcontext() if compact else uncompacted():
            return polar.polar_factor(stacked, method=method)

    return run


def embedding_rows_at(name: str, model: torch.nn.Module, batch: int, k: int, gen: torch.Generator) -> dict:
    """Embedding gradients of a target-sized batch of random tokens (only rows matter here)."""
    if name != "bert-base":
        return {}
    model = copy.deepcopy(model)
    emb = model.bert.embeddings
    ids = torch.randint(0, emb.word_embeddings.num_embeddings, (batch * k, 128), generator=gen)
    ids = ids.to(emb.word_embeddings.weight.device)
    emb(input_ids=ids).square().mean().backward()
    tables = [e for e in emb.children() if isinstance(e, torch.nn.Embedding)]
    return {(*e.weight.shape, True): e.weight.grad.detach().clone() for e in tables}


def form(G: torch.Tensor) -> str:
    """Which iteration ``method="auto"`` runs on ``G`` (before any zero line is dropped)."""
    wide = G if G.shape[0] <= G.shape[1] else G.mT
    return "gram" if polar._use_gram("auto", wide, torch.float32) else "plain"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_model(name: str, batch: int, k: int, rounds: int, layers: int | None, device: str = "cpu") -> dict:
    kwargs = {} if layers is None or name == "resnet50" else {"layers": layers}
    torch.manual_seed(0)
    model, make_batch, loss = fm.BUILDERS[name](**kwargs)
    model.to(device)
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(x.to(device) for x in make_batch(batch, gen)) for _ in range(k)]

    def build(cls, schedule=None, **kw):
        m = copy.deepcopy(model)
        opt = cls(m.parameters(), torch.optim.SGD, lr=1e-3, ascent_schedule=schedule, **kw)
        if schedule is not None:
            schedule.count = 1  # past step 0: every step is the one-pass step
        return lambda: opt.step(lambda: [loss(m, b) for b in batches])

    calls: dict[str, Callable[[], object]] = {
        "SAM": build(torchsage.SAM, rho=0.05),
        "SAGE": build(torchsage.SAGE, rho=0.05, gamma=1e-3),
        "SAM 1-pass": build(torchsage.SAM, EveryK(NEVER), rho=0.05),
        "SAGE 1-pass": build(torchsage.SAGE, EveryK(NEVER), rho=0.05, gamma=1e-3),
    }
    shapes = groups_by_shape(model, batches, loss)
    for shape, mats in shapes.items():
        calls[f"plain {shape}"] = ns_call(mats, "newton_schulz", compact=False)
        calls[f"now {shape}"] = ns_call(mats, "auto", compact=True)
    target = TARGET_BATCH[name]
    for shape, G in embedding_rows_at(name, model, target, k, gen).items():
        calls[f"target {shape}"] = ns_call([G], "auto", compact=True)
    names = list(calls)
    calls["SAM"]()  # warm-up: allocations of the passes, and of the polar factors' first calls
    for n in names:
        if n.startswith(("now", "target")):
            calls[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        gc.collect()
        for n in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[n]()
            sync(device)
            times[n].append(time.perf_counter() - start)
        print(f"  {name}: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    per_shape = [
        {
            "shape": list(shape),
            "count": len(mats),
            "embedding": shape[2],
            "method": form(mats[0]),
            "plain_s": med[f"plain {shape}"],
            "now_s": med[f"now {shape}"],
            "target_s": med.get(f"target {shape}"),
        }
        for shape, mats in shapes.items()
    ]
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "k": k,
        "rounds": rounds,
        "target_batch": target,
        "steps_s": {n: med[n] for n in ("SAM", "SAGE", "SAM 1-pass", "SAGE 1-pass")},
        "per_shape": per_shape,
        "raw": times,
    }


def summarise(row: dict, ks: tuple[int, ...]) -> dict:
    s = row["steps_s"]
    ns_plain = sum(x["plain_s"] for x in row["per_shape"])
    ns_now = sum(x["now_s"] for x in row["per_shape"])
    emb_now = sum(x["now_s"] for x in row["per_shape"] if x["embedding"])
    emb_target = sum(
        x["target_s"] if x["target_s"] is not None else x["now_s"] for x in row["per_shape"] if x["embedding"]
    )
    scale = row["target_batch"] / row["batch"]
    extra = s["SAGE"] - s["SAM"]  # polar factors, statistics: not growing with the batch
    sam_t = s["SAM"] * scale
    sage_t = sam_t + extra - emb_now + emb_target
    one_sam_t = s["SAM 1-pass"] * scale
    one_sage_t = one_sam_t + (s["SAGE 1-pass"] - s["SAM 1-pass"])
    out = {
        "sage_over_sam": s["SAGE"] / s["SAM"],
        "ns_share_plain": ns_plain / (s["SAGE"] - ns_now + ns_plain),
        "ns_share_now": ns_now / s["SAGE"],
        "ns_plain_s": ns_plain,
        "ns_now_s": ns_now,
        "embedding_ns_s": emb_now,
        "projected_sage_over_sam": sage_t / sam_t,
        "projected_ns_share": (ns_now - emb_now + emb_target) / sage_t,
        "projected_sage_over_sam_embeddings_gradient": (sage_t - emb_target) / sam_t,
    }
    for k in ks:
        sage_k = (s["SAGE"] + (k - 1) * s["SAGE 1-pass"]) / k
        sam_k = (s["SAM"] + (k - 1) * s["SAM 1-pass"]) / k
        out[f"every{k}_sage_over_sage"] = sage_k / s["SAGE"]
        out[f"every{k}_sage_over_sam_every{k}"] = sage_k / sam_k
        out[f"every{k}_sage_over_sam"] = sage_k / s["SAM"]
        proj_sage_k = (sage_t + (k - 1) * one_sage_t) / k
        proj_sam_k = (sam_t + (k - 1) * one_sam_t) / k
        out[f"projected_every{k}_sage_over_sam"] = proj_sage_k / sam_t
        out[f"projected_every{k}_sage_over_sam_every{k}"] = proj_sage_k / proj_sam_k
    return out


def report(rows: list[dict], ks: tuple[int, ...]) -> str:
    lines = [
        "| model | params | K x batch | SAM (s) | SAGE (s) | SAGE/SAM | NS share before | NS share now "
        "| 1-pass SAM / SAGE (s) | projected SAGE/SAM at target | projected, embeddings 'gradient' |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s, m = row["steps_s"], row["summary"]
        cells = [
            row["model"],
            f"{row['parameters'] / 1e6:.1f}M",
            f"{row['k']} x {row['batch']}",
            f"{s['SAM']:.2f}",
            f"{s['SAGE']:.2f}",
            f"{m['sage_over_sam']:.2f}",
            f"{m['ns_share_plain']:.0%}",
            f"{m['ns_share_now']:.0%}",
            f"{s['SAM 1-pass']:.2f} / {s['SAGE 1-pass']:.2f}",
            f"{m['projected_sage_over_sam']:.2f} (K x {row['target_batch']})",
            f"{m['projected_sage_over_sam_embeddings_gradient']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | "
        + " | ".join(f"EveryK({k}): SAGE/SAGE, SAGE/SAM, SAGE/SAM same k, projected" for k in ks)
        + " |",
    ]
    lines.append("|---|" + "---|" * len(ks))
    for row in rows:
        m = row["summary"]
        cells = [
            ", ".join(
                f"{m[key]:.2f}"
                for key in (
                    f"every{k}_sage_over_sage",
                    f"every{k}_sage_over_sam",
                    f"every{k}_sage_over_sam_every{k}",
                    f"projected_every{k}_sage_over_sam_every{k}",
                )
            )
            for k in ks
        ]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    for row in rows:
        lines += [
            "",
            f"Newton-Schulz per shape, {row['model']} (ms, all matrices of the shape, stacked):",
            "",
        ]
        lines += ["| shape | count | form now | before | now | now/before |", "|---|---|---|---|---|---|"]
        for x in sorted(row["per_shape"], key=lambda x: -x["plain_s"]):
            tag = " (embedding)" if x["embedding"] else ""
            target = f"; {x['target_s'] * 1e3:.0f} at the target batch" if x["target_s"] is not None else ""
            shape = f"{x['shape'][0]} x {x['shape'][1]}{tag}"
            lines.append(
                f"| {shape} | {x['count']} | {x['method']} | {x['plain_s'] * 1e3:.0f} | "
                f"{x['now_s'] * 1e3:.0f}{target} | {x['now_s'] / max(x['plain_s'], 1e-9):.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(fm.BUILDERS), default=list(fm.BUILDERS))
    parser.add_argument(
        "--batch", type=int, default=None, help="examples per distribution (default: 2 on CPU)"
    )
    parser.add_argument("--k", type=int, default=2, help="number of distributions")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, nargs="+", default=[2, 5, 10], help="k of the EveryK rows")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1-layer encoders, 1 round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    layers = 1 if args.quick else None
    rounds = 1 if args.quick else args.rounds
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {rounds} rounds"
    )
    rows = []
    for name in args.models:
        batch = args.batch or CPU_BATCH[name]
        row = bench_model(name, batch, args.k, rounds, layers, args.device)
        row["summary"] = summarise(row, tuple(args.every))
        rows.append(row)
    print(report(rows, tuple(args.every)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
