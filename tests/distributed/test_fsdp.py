"""FSDP2 (``fully_shard``, DTensor parameters) under torchrun: 2 gloo processes against the
one-process run on the union of their shards."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torchrun_launch

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("fsdp_worker", HERE / "fsdp_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

pytest.importorskip("torch.distributed.fsdp")
RUNNABLE = [n for n, c in worker.SCENARIOS.items() if not c.get("refused")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = torchrun_launch.torchrun([str(HERE / "fsdp_worker.py"), str(out)])[0]
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in (0, 1)] for name in worker.SCENARIOS}


@pytest.mark.parametrize("name", RUNNABLE)
def test_sharded_steps_equal_the_one_process_steps(results, name):
    reference = worker.run(name, None, 1)
    for rank in results[name]:
        # the shards' gradients are the reduce-scatter's average of two half-batch means against
        # the one-process mean of 8 terms (float32, ~2e-7 relative), through 3 SGD steps: 1e-6
        for p, q in zip(rank["params"], reference["params"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for mine, ref in zip(rank["infos"], reference["infos"]):
            assert mine["skipped"] == ref["skipped"]
            if not ref["skipped"]:
                assert mine["perturbation_norm"] == pytest.approx(ref["perturbation_norm"], rel=1e-5)
                assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    start = worker.build_model()
    moved = max(float((p - q.detach()).abs().max()) for p, q in zip(reference["params"], start.parameters()))
    assert moved > 1e-2  # far beyond the tolerance: a shard stepped on its own would show


def test_nonfinite_shard_skips_the_step_on_every_process(results):
    for rank in results["sam_nan"]:
        assert [i["skipped"] for i in rank["infos"]] == [False, True, False]
        skipped = rank["infos"][1]
        assert math.isnan(skipped["perturbed_loss"])


@pytest.mark.parametrize("name", ["sage_refused", "gsam_refused"])
def test_optimizers_without_sharded_support_refuse_on_every_process(results, name):
    for rank in results[name]:
        assert "does not take FSDP2 (fully_shard, DTensor) parameters yet" in rank["error"]
        assert "use SAM, ASAM or SAGM on the sharded model" in rank["error"]
