"""The DDP and FSDP2 examples of docs/distributed.md under torchrun (2 processes) print the same
line on both processes as the one-process run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torchrun_launch

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"


def _two_processes_and_one(tmp_path, marker: str, prefix: str) -> tuple[list[tuple], tuple]:
    """Runs the docs example holding ``marker`` under torchrun (2 processes) and alone; returns the
    two processes' printed fields, sorted by rank, and the one-process run's."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    script = tmp_path / "train.py"
    script.write_text(next(b for b in blocks if marker in b))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # each rank's stdout in its own file: printed lines do not interleave
    two, logs = torchrun_launch.torchrun([str(script)], log_dir=tmp_path / "logs")
    assert two.returncode == 0, two.stderr[-4000:]
    printed = "\n".join(f.read_text() for f in sorted(logs.rglob("stdout.log")))
    one = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    pattern = re.compile(prefix + r"rank (\d)/(\d): loss (\S+) disagreement (\S+) checksum (\S+)")
    lines = sorted(pattern.findall(printed))
    assert [(r, w) for r, w, *_ in lines] == [("0", "2"), ("1", "2")]
    (single,) = pattern.findall(one.stdout)
    assert single[:2] == ("0", "1")
    return lines, single


@pytest.mark.parametrize(
    ("marker", "prefix"), [("DistributedDataParallel(model)", ""), ("fully_shard(model", "fsdp ")]
)
def test_example_two_processes_match_one(tmp_path, marker, prefix):
    """DDP: replicas identical, the union's losses on both. FSDP2: one model, the whole batches'
    losses on both. Against one process: float32 sums in another order (DDP's all-reduce, FSDP2's
    shard means and Gram-form polar factors), a few ulp carried through 5 SGD steps."""
    lines, single = _two_processes_and_one(tmp_path, marker, prefix)
    assert lines[0][2:] == lines[1][2:]
    for a, b in zip(lines[0][2:], single[2:]):
        assert abs(float(a) - float(b)) <= 1e-5 * max(1.0, abs(float(b)))
    assert float(single[3]) > 0.1  # a real disagreement between the three distributions
