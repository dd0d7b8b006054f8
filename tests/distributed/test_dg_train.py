"""`torchsage dg train` under torchrun (2 gloo processes): rank 0 writes the run directory and the
records match the one-process run; the slicing of minibatches and of the evaluation is exact."""

import json

import pytest
import torch
import torchrun_launch
from torch.utils.data import Subset, TensorDataset

from torchsage.dg.train import TrainArgs, count_correct, infinite_batches, train

# SGD, not DomainBed's default Adam: Adam's step g / (sqrt(v) + eps) is about lr * sign(g) for a
# coordinate whose gradient is zero up to rounding (|g| ~ 1e-9 here, a cancelling sum), so the
# rounding of the shard average against the whole-batch sum (both right) moves such a coordinate by
# up to lr in either direction: after 4 steps the two runs' weights differed by 3e-3 relative, and
# the disagreement (a function of the gradients, which move with H dw) by 4e-4 while the loss (which
# moves with g . dw, and g ~ 0 along those coordinates) agreed to 1e-6. SGD maps a gradient error
# dg to a weight error lr * dg, so the runs stay within float32 rounding of each other.
HPARAMS = '{"cnn_width": 8, "batch_size": 8, "optimizer": "sgd", "lr": 0.05}'
STEPS = 4


def run_cli_under_torchrun(algorithm, out):
    cmd = ["-m", "torchsage", "dg", "train", "--dataset", "RotatedDigits", "--algorithm", algorithm]
    cmd += ["--test-envs", "0", "--steps", str(STEPS), "--checkpoint-freq", "1", "--hparams", HPARAMS]
    cmd += ["--output-dir", str(out), "--save-model", "--no-progress"]
    return torchrun_launch.torchrun(cmd)[0]


# the optimizer's reduction; the step hook; Mixup's draws, the same in every process
@pytest.mark.parametrize("algorithm", ["SAGE", "ERM", "Mixup"])
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
                steps=STEPS,
                checkpoint_freq=1,
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
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(STEPS))  # rank 0 wrote once
    # Error estimate for what follows: a gradient is a float32 sum of ~8 * 28 * 28 = 6e3 terms (batch
    # and conv positions); the shard average and the whole-batch sum round differently, by about
    # sqrt(6e3) * 2**-24 = 5e-6 relative, and SGD carries that into the weights as lr * dg per step
    # (lr * ||H|| < 1 over 4 steps: no growth). Measured: 3e-7 on the disagreement, 1e-7 on the loss.
    for a, b in zip(two, one):
        accuracies = sorted(k for k in b if k.endswith("_acc"))
        assert sorted(k for k in a if k.endswith("_acc")) == accuracies and len(accuracies) == 12
        # a prediction flips only where its top-two logits are within ~1e-6: at most one example
        # of a 60-example split, and in practice none
        assert all(abs(a[k] - b[k]) <= 1 / 60 + 1e-12 for k in accuracies)
        # the loss is a mean of 16 cross-entropies at weights equal to ~5e-6: 1e-5
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        if algorithm == "SAGE":
            # sqrt(V) / ||g_bar|| with sqrt(V) ~ 2 ||g_bar||: the gradients' 5e-6 times a condition
            # number of a few, with a factor 5 of margin: 1e-4
            assert a["disagreement"] == pytest.approx(b["disagreement"], rel=1e-4)
        assert a["args"] == b["args"] | {"output_dir": a["args"]["output_dir"]}
    m2 = torch.load(tmp_path / "two" / "model.pt", weights_only=False)["model"]
    m1 = torch.load(tmp_path / "one" / "model.pt", weights_only=False)["model"]
    for k in m1:
        # 4 SGD steps of lr * dg with dg ~ 5e-6 |g|: the weights agree to well under 1e-5 of their size
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-5, atol=1e-6)


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
    whole = infinite_batches(data, 6, seed=3, num_workers=0)
    parts = [infinite_batches(data, 6, seed=3, num_workers=0, rank=r, world=3) for r in range(3)]
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
    shares = [count_correct(Constant(), data, 0, batch_size=4, rank=r, world=2) for r in range(2)]
    if kind == "tensors":  # label 0 everywhere: the even inputs 2, 4, ..., 28 are right
        assert [sum(c for c, _ in shares), sum(t for _, t in shares)] == [14, 27]
    else:  # label i % 3: right where it equals the parity class i % 2
        expected = sum(1 for i in range(2, 29) if (i % 3) == (i % 2))
        assert [sum(c for c, _ in shares), sum(t for _, t in shares)] == [expected, 27]
    assert shares[0][1] == 14 and shares[1][1] == 13
