"""Peak memory of one optimisation step as the number of distributions K grows.

Each (method, K) pair runs in a fresh child process (this script with ``--child``), so peaks of
different runs never mix. Torch's CPU allocations bypass Python's allocator (``tracemalloc`` does
not see them), so the measure is the process's resident set size:

1. build the model, the K batches and the optimizer, run one warm-up step (one-time allocations
   of the libraries), drop the gradients;
2. reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0; this
   also resets ``getrusage().ru_maxrss``) and read the current RSS: the baseline;
3. run ``--steps`` steps (default 2) and read the peak RSS (``ru_maxrss``).

The step's peak is peak minus baseline. Where the counter cannot be reset, the child skips the
warm-up and uses ``ru_maxrss`` after building as the baseline (an upper bound on the baseline, so
the step's peak can come out low); the table says which mode was used. The children run with
``MALLOC_MMAP_THRESHOLD_=131072`` so glibc hands every large tensor back to the system when it is
freed and the RSS follows the live tensors.

Growth from the smallest to the largest K is also given in units of one gradient copy
(number of parameters x 4 bytes). The default model is the 784-2048-2048-10 MLP (5.8M parameters,
23 MB per gradient copy, batch 32 per distribution), where gradient copies dominate activations.

Methods: ERM (for reference), SAM, SAGE with a closure returning the list of losses, SAGE with a
closure returning a generator (one distribution's graph alive at a time), and the reference design
(K flattened gradient copies stacked into a K x P matrix).

    python benchmarks/memory.py                # K in {2, 3, 5, 8}
    python benchmarks/memory.py --quick        # K in {2, 8}
    python benchmarks/memory.py --model cnn --batch 64
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys

import torch
from tqdm import tqdm

from _models import METHODS, build_step, count_parameters, make_batches, make_model

MiB = 2**20
DEFAULT_METHODS = ["erm", "sam", "sage", "sage_gen", "reference"]


def current_rss() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size in bytes (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Resets the peak-RSS counter to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss() <= current_rss() + 4 * MiB


def child(args: argparse.Namespace) -> None:
    model = make_model(args.model)
    batches = make_batches(args.k, args.batch)
    step = build_step(args.method, model, batches)
    if reset_peak():
        mode = "reset"
        step()  # warm-up: one-time allocations of torch and its kernels
        model.zero_grad(set_to_none=True)
        gc.collect()
        reset_peak()
        baseline = current_rss()
    else:
        mode = "no-reset"
        gc.collect()
        baseline = peak_rss()
    for _ in range(args.steps):
        step()
    peak = peak_rss()
    params = count_parameters(model)
    print(json.dumps(dict(mode=mode, baseline=baseline, peak=peak, params=params)))


def run_child(args: argparse.Namespace, method: str, k: int) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        f"--method={method}",
        f"--k={k}",
        f"--model={args.model}",
        f"--batch={args.batch}",
        f"--steps={args.steps}",
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child {method} K={k} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 3, 5, 8], help="numbers of distributions")
    parser.add_argument("--model", choices=["mlp-wide", "mlp", "cnn"], default="mlp-wide")
    parser.add_argument("--batch", type=int, default=32, help="batch size per distribution")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per child")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the children")
    parser.add_argument("--json", default=None, help="also write the raw measurements to this file")
    parser.add_argument("--quick", action="store_true", help="smoke run: K in {2, 8}")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.ks = sorted({min(args.ks), max(args.ks)})

    runs = [(m, k) for m in args.methods for k in args.ks]
    results: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    for method, k in tqdm(runs, desc="children", file=sys.stderr, leave=False):
        results[method][k] = run_child(args, method, k)

    params = next(iter(next(iter(results.values())).values()))["params"]
    copy_bytes = 4 * params
    modes = {r["mode"] for rs in results.values() for r in rs.values()}
    print(f"torch {torch.__version__}; model {args.model}: {params:,} parameters")
    print(f"one gradient copy = {params:,} x 4 bytes = {copy_bytes / MiB:.1f} MiB")
    print(
        f"batch {args.batch} per distribution; {args.steps} measured steps per fresh process; "
        f"peak-RSS mode: {', '.join(sorted(modes))}"
    )
    print("cells: peak RSS during the steps minus the RSS before them, MiB\n")
    lo, hi = min(args.ks), max(args.ks)
    header = " | ".join(f"K={k}" for k in args.ks)
    print(f"| method | baseline MiB | {header} | growth K={lo}->{hi} (gradient copies) |")
    print("|---|--:|" + "--:|" * len(args.ks) + "--:|")
    for method in args.methods:
        rs = results[method]
        step_peak = {k: (rs[k]["peak"] - rs[k]["baseline"]) for k in args.ks}
        cells = " | ".join(f"{step_peak[k] / MiB:.1f}" for k in args.ks)
        growth = (step_peak[hi] - step_peak[lo]) / copy_bytes
        baseline = rs[lo]["baseline"] / MiB
        print(f"| {METHODS[method]} | {baseline:.0f} | {cells} | {growth:+.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
