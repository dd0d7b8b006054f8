"""One prepared check to run where a GPU is available: bf16 against float32 Newton-Schulz (accuracy
against a float64 SVD, and speed), and the SAGE / SAM step-time ratio on the card.

Sections (each one runs even if an earlier one failed; its error is printed and recorded):

1. **accuracy**: ``torchsage.polar_factor`` in float32 and bfloat16 on the device against the exact
   polar factor from a float64 SVD, per shape, spectrum and schedule (the measures of
   ``benchmarks/newton_schulz.py``: orthogonality error, RMS distance to the exact factor, and the
   distance between the bf16 and the float32 results);
2. **ns_speed**: milliseconds to orthogonalise every gradient matrix of a few model shapes, float32
   and bfloat16, eager and ``torch.compile``d, matrices of equal shape batched (SAGE's ascent),
   and float32 one matrix at a time (``fp32 loop``: what batching buys);
3. **step_time**: one optimisation step of ERM, SAM, SAGE (float32 Newton-Schulz), SAGE with
   bf16 Newton-Schulz and SAGE with the compiled kernel, on the models and random batches of
   ``benchmarks/step_time.py`` (``_models.py``), medians of interleaved rounds, with the
   SAGE / SAM ratio;
4. **dg_train**: ``torchsage dg train --device`` end to end on a generated image folder with
   ResNet-18 (``benchmarks/dg_device_check.py``): every batch, parameter, buffer, optimizer state
   and SAGE's noise generator on the device, then the documented command for ERM and SAGE with
   its seconds per step;
5. **fsdp_vs_ddp**: ``benchmarks/fsdp_vs_ddp.py`` under torchrun with FSDP2 and with DDP (SAGE on a
   784-4096-4096-4096-10 MLP): step time and peak memory per process, at 2 processes when two
   GPUs are visible, else at 1.
6. **gram_speed**: Newton-Schulz on the Gram matrix against the plain iteration, per shape, in
   float32 and bfloat16 (``benchmarks/gram_newton_schulz.py``): where ``polar_method="auto"``
   should take the Gram form on this device (it keeps the plain one off the CPU until measured);
7. **finetune_step**: SAM, SAGE and their one-pass steps on ResNet-50, BERT-base and ViT-S at 2
   distributions x 32 examples (``benchmarks/finetune_step.py``): SAGE/SAM, the Newton-Schulz
   share, per-shape times and the mean step of ``EveryK(k)``.

It prints markdown tables headed by the card's name and writes everything as JSON to
``$OUT/gpu_check.json`` when ``OUT`` is set (and to ``--json PATH`` if given), written whole.

    python benchmarks/gpu_check.py                          # on the GPU machine (a few minutes)
    python benchmarks/gpu_check.py --quick --device cpu     # smoke run here (under a minute)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import torchsage
except ImportError:  # a checkout that is not installed: use its sources
    sys.path.insert(0, str(HERE.parent / "src"))
    import torchsage

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import finetune_step  # noqa: E402
import gram_newton_schulz  # noqa: E402
import newton_schulz as ns  # noqa: E402
from _models import build_step, count_parameters, make_batches, make_model  # noqa: E402

#: the gradient-matrix shapes timed in section 2
GPU_MODEL_SHAPES: dict[str, list[tuple[int, int]]] = {
    "mnist_cnn": ns.MODEL_SHAPES["mnist_cnn"],
    "transformer_w256_d12": ns.MODEL_SHAPES["transformer_w256_d12"],
    # GPT-2-small-like blocks: q, k, v, o (768 x 768), MLP (3072 x 768) and (768 x 3072)
    "transformer_w768_d12": [(768, 768)] * 48 + [(3072, 768)] * 12 + [(768, 3072)] * 12,
}
GPU_SHAPES = ((128, 576), (768, 768), (1024, 4096), (4096, 1024))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def card_name(device: str) -> str:
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return "no GPU (CPU run)"


def section(name: str, results: dict, fn: Callable[[], object]) -> None:
    """Runs one section; an exception is printed and recorded, and the next section runs."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as error:
        traceback.print_exc()
        results[name] = {"error": f"{type(error).__name__}: {error}"}
        print(f"\n{name}: FAILED ({type(error).__name__}: {error})")
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)


# -- 2. Newton-Schulz speed ------------------------------------------------------------------------


def ns_speed(models: Sequence[str], device: str, rounds: int, compile: bool) -> list[dict]:
    rows = []
    for model in models:
        grads = [g.to(device) for g in ns.gradient_like(GPU_MODEL_SHAPES[model])]
        calls: dict[str, Callable[[], object]] = {
            "fp32 loop": lambda g=grads: [torchsage.polar_factor(x.reshape(x.shape[0], -1)) for x in g]
        }
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for compiled in (False, True) if compile else (False,):
                ascent = torchsage.optim.PolarAscent(dtype=dtype, compile=compiled)
                calls[tag + ("+compile" if compiled else "")] = lambda a=ascent, g=grads: a.directions(g)
        warm = {}
        for name, call in list(calls.items()):
            start = time.perf_counter()
            try:
                call()
                call()
                sync(device)
            except RuntimeError as error:  # compile failure: reported, the eager rows still run
                print(f"{model} {name}: {error}", file=sys.stderr)
                del calls[name]
                continue
            warm[name] = time.perf_counter() - start
        times: dict[str, list[float]] = {name: [] for name in calls}
        names = list(calls)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                sync(device)
                start = time.perf_counter()
                calls[name]()
                sync(device)
                times[name].append(time.perf_counter() - start)
        row = {"model": model, "matrices": len(grads)}
        row.update({f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()})
        row.update({f"{k}_warmup_s": round(v, 2) for k, v in warm.items()})
        rows.append(row)
    return rows


def ns_speed_table(rows: list[dict]) -> str:
    variants = ["fp32 loop", "fp32", "bf16", "fp32+compile", "bf16+compile"]
    present = [v for v in variants if any(f"{v}_ms" in r for r in rows)]
    lines = [
        "| model | matrices | " + " | ".join(f"{v} ms" for v in present) + " | fp32/bf16 |",
        "|---|--:|" + "--:|" * (len(present) + 1),
    ]
    nan = float("nan")
    for r in rows:
        cells = " | ".join(f"{r.get(f'{v}_ms', nan):.2f}" for v in present)
        ratio = r.get("fp32_ms", nan) / r.get("bf16_ms", nan)
        lines.append(f"| {r['model']} | {r['matrices']} | {cells} | {ratio:.2f} |")
    return "\n".join(lines)


# -- 3. step time ----------------------------------------------------------------------------------

STEP_METHODS = ("erm", "sam", "sage", "sage_bf16", "sage_compile")


def step_calls(name: str, k: int, batch: int, device: str, compile: bool) -> dict[str, Callable[[], object]]:
    base = make_model(name).to(device)
    batches = [(x.to(device), y.to(device)) for x, y in make_batches(k, batch)]
    calls = {m: build_step(m, copy.deepcopy(base), batches) for m in ("erm", "sam", "sage")}
    variants = {"sage_bf16": dict(ns_dtype=torch.bfloat16)}
    if compile:
        variants["sage_compile"] = dict(ns_compile=True)
    for method, extra in variants.items():
        model = copy.deepcopy(base)
        opt = torchsage.SAGE(
            model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.01, seed=0, lr=0.01, **extra
        )

        def closure(model: torch.nn.Module = model) -> list[torch.Tensor]:
            return [F.cross_entropy(model(x), y) for x, y in batches]

        calls[method] = lambda opt=opt, closure=closure: opt.step(closure)
    return calls


def step_time(
    models: Sequence[str], ks: Sequence[int], batch: dict[str, int], device: str, rounds: int, compile: bool
) -> list[dict]:
    rows = []
    for name in models:
        for k in ks:
            calls = step_calls(name, k, batch[name], device, compile)
            for method, call in list(calls.items()):  # warm-up (and compilation)
                try:
                    call()
                    call()
                    sync(device)
                except RuntimeError as error:
                    print(f"{name} K={k} {method}: {error}", file=sys.stderr)
                    del calls[method]
            times: dict[str, list[float]] = {m: [] for m in calls}
            names = list(calls)
            for r in range(rounds):
                gc.collect()
                for m in names[r % len(names) :] + names[: r % len(names)]:
                    sync(device)
                    start = time.perf_counter()
                    calls[m]()
                    sync(device)
                    times[m].append(time.perf_counter() - start)
            row = {
                "model": name,
                "parameters": count_parameters(make_model(name)),
                "K": k,
                "batch": batch[name],
            }
            row.update({f"{m}_ms": statistics.median(v) * 1e3 for m, v in times.items()})
            rows.append(row)
    return rows


def step_table(rows: list[dict]) -> str:
    nan = float("nan")
    present = [m for m in STEP_METHODS if any(f"{m}_ms" in r for r in rows)]
    lines = [
        "| model | K | batch | " + " | ".join(f"{m} ms" for m in present) + " | SAGE/SAM | SAGE bf16/SAM |",
        "|---|--:|--:|" + "--:|" * (len(present) + 2),
    ]
    for r in rows:
        cells = " | ".join(f"{r.get(f'{m}_ms', nan):.2f}" for m in present)
        sam = r.get("sam_ms", nan)
        lines.append(
            f"| {r['model']} | {r['K']} | {r['batch']} | {cells} "
            f"| {r.get('sage_ms', nan) / sam:.2f} | {r.get('sage_bf16_ms', nan) / sam:.2f} |"
        )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------


def run_fsdp_vs_ddp(mode: str, world: int, quick: bool) -> dict:
    """benchmarks/fsdp_vs_ddp.py under torchrun: its JSON line (step time, peak memory per process)."""
    import json
    import subprocess

    width = "256" if quick else "4096"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    cmd += [str(HERE / "fsdp_vs_ddp.py"), "--mode", mode, "--width", width, "--steps", "3" if quick else "10"]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} at {world} process(es) failed: {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: small shapes and models, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20, quick 3)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--dg-backbone",
        default="resnet18",
        help="section 4's backbone (mnist_cnn: smoke run without torchvision)",
    )
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check: error: --device {device} but torch {torch.__version__} sees no CUDA device",
            file=sys.stderr,
        )
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device == "cpu":
        torch.set_num_threads(1)
    rounds = args.rounds or (3 if args.quick else 20)
    compile = not args.no_compile and not args.quick  # compiling takes minutes on a CPU
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in these tables
        torch.backends.cudnn.allow_tf32 = False

    card = card_name(device)
    print(f"# torchsage GPU check: {card}\n")
    print(ns.environment(device))
    results: dict = {
        "card": card,
        "device": device,
        "environment": ns.environment(device),
        "quick": args.quick,
    }

    shapes = ns.QUICK_SHAPES if args.quick else GPU_SHAPES
    spectra = ("gaussian", "cond 1e2", "rank 8") if args.quick else ns.SPECTRA
    samples = 1 if args.quick else 3

    def accuracy() -> list[dict]:
        rows = ns.accuracy(shapes, spectra, samples=samples, device=device, progress=False)
        print(f"\n## Newton-Schulz accuracy against a float64 SVD on {card} (median of {samples})\n")
        print(ns.accuracy_table(rows))
        return rows

    section("accuracy", results, accuracy)

    ns_models = ("mnist_cnn",) if args.quick else tuple(GPU_MODEL_SHAPES)

    def speed() -> list[dict]:
        rows = ns_speed(ns_models, device, rounds, compile)
        print(f"\n## Newton-Schulz time per ascent (all matrices, batched by shape), median of {rounds}\n")
        print(ns_speed_table(rows))
        return rows

    section("ns_speed", results, speed)

    models = ("mlp",) if args.quick else ("cnn", "mlp-wide")
    ks = (2,) if args.quick else (2, 3, 5)
    batch = {"cnn": 64, "mlp": 32, "mlp-wide": 256}

    def steps() -> list[dict]:
        rows = step_time(models, ks, batch, device, rounds, compile)
        print(f"\n## Step time on {card} (SGD lr 0.01, rho 0.05, gamma 0.01), median of {rounds} rounds\n")
        print(step_table(rows))
        return rows

    section("step_time", results, steps)

    def dg_train() -> dict:
        import dg_device_check

        return dg_device_check.run(device, args.quick, args.dg_backbone, workers=min(4, os.cpu_count() or 1))

    section("dg_train", results, dg_train)

    def fsdp_vs_ddp() -> list[dict]:
        # two processes need two devices (NCCL takes one GPU per process); with one GPU the FSDP2
        # step still runs, in one process, and the comparison is left to a machine with two
        gpus = torch.cuda.device_count() if device.startswith("cuda") else 2
        world = min(2, gpus)
        rows = [run_fsdp_vs_ddp(mode, world, args.quick) for mode in ("fsdp", "ddp")]
        print(f"\n## FSDP2 against DDP under SAGE, {world} process(es) on {card}\n")
        for row in rows:
            print(f"- {row}")
        return rows

    section("fsdp_vs_ddp", results, fsdp_vs_ddp)

    def gram_speed() -> dict:
        shapes = gram_newton_schulz.QUICK_SHAPES if args.quick else gram_newton_schulz.SHAPES
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            rows = gram_newton_schulz.measure(shapes, rounds, device, dtype)
            print(f"\n## Gram against plain Newton-Schulz, {dtype}, on {card} (median of {rounds})\n")
            print(gram_newton_schulz.table(rows))
            out[str(dtype)] = rows
        return out

    section("gram_speed", results, gram_speed)

    def finetune() -> list[dict]:
        names = ("vit-s",) if args.quick else tuple(finetune_step.fm.BUILDERS)
        batch, finetune_rounds = (2, 1) if args.quick else (32, 5)
        rows = []
        for name in names:
            row = finetune_step.bench_model(
                name, batch, 2, finetune_rounds, 1 if args.quick else None, device
            )
            row["summary"] = finetune_step.summarise(row, (2, 5, 10))
            rows.append(row)
        print(f"\n## Fine-tuning shapes on {card}: 2 distributions x {batch} examples\n")
        print(finetune_step.report(rows, (2, 5, 10)))
        return rows

    section("finetune_step", results, finetune)

    targets = [Path(args.json)] if args.json else []
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "gpu_check.json")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        ns.write_json(target, results)
        print(f"\nresults written to {target}")
    failed = [name for name, value in results.items() if isinstance(value, dict) and "error" in value]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
