"""The DDP example of docs/distributed.md under torchrun (2 processes) prints the same line on
both processes as the one-process run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torchrun_launch

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"


def test_ddp_example_two_processes_match_one(tmp_path):
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    script = tmp_path / "train_ddp.py"
    script.write_text(next(b for b in blocks if "DistributedDataParallel(model)" in b))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # each rank's stdout in its own file: printed lines do not interleave
    two, logs = torchrun_launch.torchrun([str(script)], log_dir=tmp_path / "logs")
    assert two.returncode == 0, two.stderr[-4000:]
    printed = "\n".join(f.read_text() for f in sorted(logs.rglob("stdout.log")))
    one = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    pattern = re.compile(r"rank (\d)/(\d): loss (\S+) disagreement (\S+) checksum (\S+)")
    lines = sorted(pattern.findall(printed))
    assert [(r, w) for r, w, *_ in lines] == [("0", "2"), ("1", "2")]
    assert lines[0][2:] == lines[1][2:]  # replicas identical, losses of the union on both
    (single,) = pattern.findall(one.stdout)
    assert single[:2] == ("0", "1")
    for a, b in zip(lines[0][2:], single[2:]):
        assert abs(float(a) - float(b)) <= 1e-5 * max(1.0, abs(float(b)))
    assert float(single[3]) > 0.1  # a real disagreement between the three distributions


def test_fsdp_example_two_processes_match_one(tmp_path):
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    script = tmp_path / "train_fsdp.py"
    script.write_text(next(b for b in blocks if "fully_shard(model" in b))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    two, logs = torchrun_launch.torchrun([str(script)], log_dir=tmp_path / "logs")
    assert two.returncode == 0, two.stderr[-4000:]
    printed = "\n".join(f.read_text() for f in sorted(logs.rglob("stdout.log")))
    one = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    pattern = re.compile(r"fsdp rank (\d)/(\d): loss (\S+) disagreement (\S+) checksum (\S+)")
    lines = sorted(pattern.findall(printed))
    assert [(r, w) for r, w, *_ in lines] == [("0", "2"), ("1", "2")]
    assert lines[0][2:] == lines[1][2:]  # one model, the whole batches' losses on both
    (single,) = pattern.findall(one.stdout)
    assert single[:2] == ("0", "1")
    # float32 shard means and Gram-form polar factors against the one-process run: a few ulp
    # carried through 5 SGD steps
    for a, b in zip(lines[0][2:], single[2:]):
        assert abs(float(a) - float(b)) <= 1e-5 * max(1.0, abs(float(b)))
    assert float(single[3]) > 0.1  # a real disagreement between the three distributions
