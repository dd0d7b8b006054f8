"""Launching two gloo processes under torchrun for the distributed tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
