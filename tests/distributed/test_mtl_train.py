"""`torchsage mtl train` under torchrun (2 gloo processes) against the one-process run."""

import json

import pytest
import torch

pytest.importorskip("torchjd")

import torchrun_launch

from torchsage.mtl.train import MTLArgs, train

TINY = dict(n_train=48, n_test=40, batch_size=16, epochs=1)


def test_mtl_train_under_torchrun_matches_one_process(tmp_path):
    cmd = ["-m", "torchsage", "mtl", "train", "--benchmark", "multidigits", "--solver", "upgrad", "--sage"]
    cmd += ["--epochs", "1", "--n-train", "48", "--n-test", "40", "--batch-size", "16", "--no-progress"]
    cmd += ["--device", "cpu", "--save-model", "--output-dir", str(tmp_path / "two")]
    proc, _ = torchrun_launch.torchrun(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(MTLArgs(benchmark="multidigits", solver="upgrad", sage=True, device="cpu", save_model=True,
                      output_dir=str(tmp_path / "one"), progress=False, **TINY))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["done", "model.pt", "results.jsonl"]
    (two,) = [json.loads(x) for x in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    (one,) = [json.loads(x) for x in (tmp_path / "one" / "results.jsonl").read_text().splitlines()]
    # Error estimate: the gradients of the shard average and of the whole batch differ by float32
    # rounding (~1e-6 relative); Adam (lr 1e-3, 3 steps) passes a relative gradient error on
    # scaled by eps / (|g| + eps), small because MultiLeNet has no parameter whose gradient is
    # zero up to rounding (no bias feeding a normalisation; see test_dg_train for one that has).
    # Measured under ATEN_CPU_CAPABILITY default and avx2: 4e-8 on the records, 2e-7 on the weights.
    assert two["left/acc"] == one["left/acc"] and two["right/acc"] == one["right/acc"]  # 40 examples
    for key in ("loss/left", "loss/right", "disagreement"):
        assert two[key] == pytest.approx(one[key], rel=1e-4)
    m2 = torch.load(tmp_path / "two" / "model.pt", weights_only=False)["model"]
    m1 = torch.load(tmp_path / "one" / "model.pt", weights_only=False)["model"]
    for k in m1:
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-3, atol=1e-4)


def test_the_slices_of_a_batch_make_it_up_again():
    from torchsage.harness.session import shard_batch as _slice

    x = torch.arange(14.0).reshape(7, 2)
    targets = {"left": torch.arange(7), "right": torch.arange(7) * 10}
    parts = [(_slice(x, r, 3), _slice(targets, r, 3)) for r in range(3)]
    assert [len(p) for p, _ in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([p for p, _ in parts]), x)
    for key in targets:
        assert torch.equal(torch.cat([t[key] for _, t in parts]), targets[key])
