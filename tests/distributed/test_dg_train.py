"""`torchsage dg train` under torchrun (2 gloo processes): rank 0 writes the run directory and the
records match the one-process run; the slicing of minibatches and of the evaluation is exact."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from torchsage.dg.train import TrainArgs, _correct, _infinite_batches, train

HPARAMS = '{"cnn_width": 8, "batch_size": 8}'


def run_cli_under_torchrun(algorithm, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "torchsage", "dg", "train", "--dataset", "RotatedDigits", "--algorithm", algorithm]
    cmd += ["--test-envs", "0", "--steps", "4", "--checkpoint-freq", "2", "--hparams", HPARAMS]
    cmd += ["--output-dir", str(out), "--save-model", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("algorithm", ["SAGE", "ERM"])  # the optimizer's reduction; the step hook
def test_dg_train_under_torchrun_matches_one_process(algorithm, tmp_path):
    proc = run_cli_under_torchrun(algorithm, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        train(
            TrainArgs(
                dataset="RotatedDigits",
                algorithm=algorithm,
                test_envs=[0],
                output_dir=str(tmp_path / "one"),
                steps=4,
                checkpoint_freq=2,
                hparams=HPARAMS,
                save_model=True,
                progress=False,
            )
        )
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["done", "model.pt", "results.jsonl"]
    two = [json.loads(line) for line in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 2, 3]  # rank 0 wrote once
    for a, b in zip(two, one):
        accuracies = sorted(k for k in b if k.endswith("_acc"))
        assert sorted(k for k in a if k.endswith("_acc")) == accuracies and len(accuracies) == 12
        assert {k: a[k] for k in accuracies} == {k: b[k] for k in accuracies}
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        if algorithm == "SAGE":
            assert a["disagreement"] == pytest.approx(b["disagreement"], rel=1e-4)
        assert a["args"] == b["args"] | {"output_dir": a["args"]["output_dir"]}
    m2 = torch.load(tmp_path / "two" / "model.pt", weights_only=False)["model"]
    m1 = torch.load(tmp_path / "one" / "model.pt", weights_only=False)["model"]
    for k in m1:
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-3, atol=1e-4)


class Wrapped(torch.utils.data.Dataset):
    """Not a tensor data set: takes the DataLoader path."""

    def __init__(self, n):
        self.x = torch.arange(n, dtype=torch.float32)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(i) % 3


@pytest.mark.parametrize("kind", ["tensors", "loader"])
def test_the_slices_of_every_process_make_up_the_one_process_batch(kind):
    n = 50
    base = TensorDataset(torch.arange(n, dtype=torch.float32), torch.arange(n) % 3)
    data = Subset(base if kind == "tensors" else Wrapped(n), list(range(5, 45)))
    whole = _infinite_batches(data, 6, seed=3, num_workers=0)
    parts = [_infinite_batches(data, 6, seed=3, num_workers=0, rank=r, world=3) for r in range(3)]
    for _ in range(4):
        x, y = next(whole)
        pieces = [next(p) for p in parts]
        assert all(len(px) == 2 for px, _ in pieces)
        assert torch.equal(torch.cat([px for px, _ in pieces]), x)
        assert torch.equal(torch.cat([py for _, py in pieces]), y)


class Constant(torch.nn.Module):
    """predict(x): class 0 for even inputs, 1 for odd ones."""

    def predict(self, x):
        return torch.stack([(x % 2 == 0).float(), (x % 2 == 1).float()], dim=1)


@pytest.mark.parametrize("kind", ["tensors", "loader"])
def test_evaluation_shares_count_every_example_once(kind):
    n = 31
    labels = torch.zeros(n, dtype=torch.long)
    base = TensorDataset(torch.arange(n, dtype=torch.float32), labels) if kind == "tensors" else Wrapped(n)
    data = Subset(base, list(range(2, 29)))  # 27 examples: 2..28
    shares = [_correct(Constant(), data, 0, batch_size=4, rank=r, world=2) for r in range(2)]
    if kind == "tensors":  # label 0 everywhere: the even inputs 2, 4, ..., 28 are right
        assert [sum(c for c, _ in shares), sum(t for _, t in shares)] == [14, 27]
    else:  # label i % 3: right where it equals the parity class i % 2
        expected = sum(1 for i in range(2, 29) if (i % 3) == (i % 2))
        assert [sum(c for c, _ in shares), sum(t for _, t in shares)] == [expected, 27]
    assert shares[0][1] == 14 and shares[1][1] == 13
