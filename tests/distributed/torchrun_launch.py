"""Launching two gloo processes under torchrun for the distributed tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch


def torchrun(args: list[str], *, log_dir: Path | None = None, timeout: int = 300):
    """Runs ``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`` once.

    With ``log_dir``, each rank's stdout goes to its own file under it (``--redirects 1``). Returns
    ``(process, log_dir)``. No relaunch: a rank that fails or aborts fails the test
    (scripts/soak_distributed.sh counts failures and aborts over repeated runs).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    if log_dir is not None:
        cmd += ["--redirects", "1", "--log-dir", str(log_dir)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=timeout)
    return proc, log_dir


def load_worker(path: Path):
    """A worker script imported by path (test files import helpers by file name, see conftest)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scenarios(worker_file: str, *needs: str):
    """``(worker, results, trained)`` for a test file: the worker script next to this file, its
    results fixture (:func:`results_fixture`) and the names of its scenarios that train. The test
    file is skipped when one of the modules ``needs`` is not installed."""
    import pytest

    for name in needs:
        pytest.importorskip(name)
    worker = load_worker(Path(__file__).parent / worker_file)
    trained = [n for n, c in worker.SCENARIOS.items() if not c.get("refused")]
    return worker, results_fixture(worker), trained


def results_fixture(worker):
    """A module-scoped fixture ``results``: the worker's ``SCENARIOS`` run once under torchrun,
    ``{name: [rank 0's result, rank 1's]}`` (the worker calls :func:`save_scenarios`)."""
    import pytest

    @pytest.fixture(scope="module")
    def results(tmp_path_factory):
        path = Path(worker.__file__)
        out = tmp_path_factory.mktemp(path.stem)
        proc = torchrun([str(path), str(out)])[0]
        assert proc.returncode == 0, proc.stderr[-4000:]
        return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in (0, 1)] for name in worker.SCENARIOS}

    return results


def save_scenarios(names, out: str, run) -> None:
    """In a worker: ``run(name)`` for each scenario, saved as ``OUT/<name>.rank<r>.pt`` (a ValueError
    recorded as ``{"error": ...}``: the tests expect it on every process); then the group ends."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    for name in names:
        try:
            result = run(name)
        except ValueError as error:
            result = {"error": str(error)}
        rank = dist.get_rank()
        print(f"rank {rank}: scenario {name} done", file=sys.stderr, flush=True)
        torch.save(result, os.path.join(out, f"{name}.rank{rank}.pt"))
    dist.barrier()  # every rank done before any tears down its connections
    dist.destroy_process_group()


def largest_gap(a, b) -> float:
    """The largest absolute difference between two lists of tensors."""
    return max(float((p - q).abs().max()) for p, q in zip(a, b))
