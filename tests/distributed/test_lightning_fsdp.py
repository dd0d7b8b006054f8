"""SAGEMixin under Lightning's FSDP2 strategy (ModelParallelStrategy, the module's configure_model
calling fully_shard): 2 gloo processes started by torchrun, each holding half of every weight and
stepping on its DistributedSampler's share of every batch, against one process on the union."""

import pytest
import torch
import torchrun_launch

worker, results, TRAINED = torchrun_launch.scenarios(
    "lightning_fsdp_worker.py", "lightning", "torch.distributed.fsdp"
)


@pytest.mark.parametrize("name", TRAINED)
def test_sharded_steps_equal_the_one_process_steps_on_the_union(results, name):
    torch.set_num_threads(1)
    reference = worker.run(name, 1)
    ranks = results[name]
    assert ranks[0]["global_step"] == reference["global_step"] == worker.STEPS
    for rank in ranks:
        assert all(rank["sharded"]) and not any(reference["sharded"])
        # the full weights (full_tensor()): each shard's gradient is the reduce-scatter's average of
        # the processes' per-domain means over 2 rows against the one-process mean over 4 (float32,
        # the same terms summed in another order, a few ulp, ~1e-7 relative); the global norms sum
        # the shards' squares in another order; 3 SGD steps with momentum through the normalised
        # ascent carry that into the weights: 1e-5 relative, 1e-6 absolute, far below how far they
        # moved (checked below)
        for p, q in zip(rank["params"], reference["params"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for mine, ref in zip(rank["infos"], reference["infos"]):
            assert mine["names"] == ref["names"]
            assert mine["losses"] == pytest.approx(ref["losses"], rel=1e-6)  # the union's losses
            assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
            assert mine["disagreement"] == pytest.approx(ref["disagreement"], rel=1e-5, nan_ok=True)
    start = worker.module_class()(worker.SCENARIOS[name]["opt"], worker.SCENARIOS[name]["kw"])
    assert torchrun_launch.largest_gap(reference["params"], [p.detach() for p in start.parameters()]) > 1e-2
    # a process stepping on its own share would end elsewhere, far beyond the tolerance
    assert torchrun_launch.largest_gap(worker.run(name, 1, ranks=(0,))["params"], reference["params"]) > 1e-2


def test_an_optimizer_built_before_fully_shard_is_refused_on_every_process(results):
    for rank in results["prebuilt"]:
        assert (
            "SAGEMixin: the model was sharded with fully_shard (FSDP2) after the optimizer" in rank["error"]
        )
