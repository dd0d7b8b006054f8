"""SAGETrainer under torchrun (accelerate's DistributedDataParallel): 2 gloo processes, each with
half the per-device batch, against one process on the union of their batches."""

import tempfile

import pytest
import torch
import torchrun_launch

worker, results, TRAINED = torchrun_launch.scenarios("hf_ddp_worker.py", "transformers", "accelerate")


@pytest.mark.parametrize("name", TRAINED)
def test_ddp_steps_equal_the_one_process_steps_on_the_union(results, name):
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        reference = worker.run(name, 1, out)
        own = worker.run(name, 1, out, ranks=(0,))
    ranks = results[name]
    assert all(rank["handed"] for rank in ranks)  # DDP reduced the perturbed pass, not the optimizer
    assert all(torch.equal(p, q) for p, q in zip(ranks[0]["params"], ranks[1]["params"]))
    assert ranks[0]["global_step"] == reference["global_step"] == worker.STEPS
    # each process's per-group mean over its rows, averaged over the 2 processes (float32 sums in
    # another order than the one-process mean over the union: a few ulp, ~1e-7 relative), and the
    # forward passes on 4 rows instead of 8 (the kernels may block the rows differently); 3 SGD
    # steps carry that into the weights (measured: 3e-8): 1e-5 relative, 1e-6 absolute
    for p, q in zip(ranks[0]["params"], reference["params"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    mine, ref = ranks[0]["info"], reference["info"]
    assert mine["names"] == ref["names"]
    assert mine["losses"] == pytest.approx(ref["losses"], rel=1e-6)  # the union's losses
    assert mine["disagreement"] == pytest.approx(ref["disagreement"], rel=1e-5, nan_ok=True)
    start = worker._test_hf().tiny_bert(0)
    assert torchrun_launch.largest_gap(reference["params"], [p.detach() for p in start.parameters()]) > 1e-1
    # a process stepping on its own share would end elsewhere, far beyond the tolerance
    assert torchrun_launch.largest_gap(own["params"], reference["params"]) > 1e-2


def test_an_optimizer_that_does_not_reduce_is_refused_on_every_process(results):
    for rank in results["refused"]:
        assert "SAGETrainer runs on 2 processes but the optimizer does not average" in rank["error"]
