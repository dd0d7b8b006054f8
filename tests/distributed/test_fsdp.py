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
RUNNABLE = [
    n for n, c in worker.SCENARIOS.items() if not (c.get("refused") or c.get("noise") or c.get("own"))
]


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
        # the one-process mean of 8 terms (float32, ~2e-7 relative); the polar factors iterate on
        # the Gram matrix of the columns instead of the rows (the same polynomial, rounded in
        # another order, a few ulp); 3 SGD steps carry that into the weights: 1e-6
        for p, q in zip(rank["params"], reference["params"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for mine, ref in zip(rank["infos"], reference["infos"]):
            assert mine["skipped"] == ref["skipped"]
            if not ref["skipped"]:
                # the losses of the whole batches (the shards' means averaged): a few float32 ulp
                assert mine["losses"] == pytest.approx(ref["losses"], rel=1e-6)
                assert mine["perturbed_loss"] == pytest.approx(ref["perturbed_loss"], rel=1e-6)
                assert mine["perturbation_norm"] == pytest.approx(ref["perturbation_norm"], rel=1e-5)
                assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
                if not math.isnan(ref["disagreement"]):
                    # float64 statistics of float32 gradients ~2e-7 apart, conditioned by a few
                    assert mine["disagreement"] == pytest.approx(ref["disagreement"], rel=1e-5)
    moved = max(float((p - q).abs().max()) for p, q in zip(reference["params"], reference["start"]))
    assert moved > 1e-2  # far beyond the tolerance: a shard stepped on its own would show


@pytest.mark.parametrize("name", ["sage_groups", "align_groups"])
def test_group_directions_matter_so_the_equality_above_tests_them(name):
    # the one-process runs with and without the groups' "ascent" keys part by far more than the
    # tolerance of the sharded-against-one-process equality: shards that ignored the keys would fail it
    plain = {**worker.SCENARIOS[name], "groups": False}
    worker.SCENARIOS[f"{name}_plain"] = plain
    try:
        a, b = worker.run(name, None, 1), worker.run(f"{name}_plain", None, 1)
    finally:
        del worker.SCENARIOS[f"{name}_plain"]
    assert max(float((p - q).abs().max()) for p, q in zip(a["params"], b["params"])) > 1e-3


def test_resumed_noisy_run_is_the_run_that_did_not_stop(results):
    # the noise stream of each process, the momentum buffers and the statistics resume from the
    # state dicts: the same float operations in the same order, so bit for bit
    for straight, resumed in zip(results["sage_noisy"], results["sage_noisy_resume"]):
        assert all(torch.equal(a, b) for a, b in zip(straight["params"], resumed["params"]))
        assert [i["noise_std"] for i in straight["infos"]] == [i["noise_std"] for i in resumed["infos"]]
        assert straight["infos"][-1]["noise_std"] > 0
    # the two processes' noise differs (their own streams), so a rank that resumed the other's
    # stream would show: the shards' weights are one model, gathered identically on both ranks
    r0, r1 = results["sage_noisy_resume"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))


def test_nonfinite_shard_skips_the_step_on_every_process(results):
    for rank in results["sam_nan"]:
        assert [i["skipped"] for i in rank["infos"]] == [False, True, False]
        skipped = rank["infos"][1]
        assert math.isnan(skipped["perturbed_loss"])


@pytest.mark.parametrize("name", ["solver_refused"])
def test_solver_on_shards_is_refused_on_every_process(results, name):
    for rank in results[name]:
        assert "does not take FSDP2 (fully_shard, DTensor) parameters with these options" in rank["error"]
        assert "drop solver= on the sharded model" in rank["error"]


def test_noise_on_shards_is_the_single_process_noise_in_distribution(results):
    # One SGD step with lr 1 and rho 0: the sharded weights end at w - g - z, the one-process run
    # without noise at w - g, so the difference is the noise z (up to the float32 rounding of g,
    # ~1e-7, against a noise std of about 5 x the disagreement).
    reference = worker.run("sage_noise", None, 1)
    r0, r1 = results["sage_noise"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))  # one model
    std = r0["infos"][0]["noise_std"]
    assert std == pytest.approx(5.0 * r0["infos"][0]["disagreement"]) and std > 0.5
    rows = {0: [], 1: []}  # each process's rows (fully_shard splits dim 0 as torch.chunk does)
    for p, q in zip(reference["params"], r0["params"]):
        noise = (p - q).reshape(p.shape[0], -1) / std
        first = noise.chunk(2)[0].shape[0]
        rows[0].append(noise[:first].reshape(-1))
        rows[1].append(noise[first:].reshape(-1))
    z0, z1 = torch.cat(rows[0]).double(), torch.cat(rows[1]).double()
    z = torch.cat([z0, z1])
    n = z.numel()  # 4 x 256 + 256 + 256 x 3 + 3 = 2051 standardised draws
    # moments of n independent standard normals: mean within 4 / sqrt(n), variance within
    # 4 sqrt(2 / n), fourth moment (3) within 4 sqrt(96 / n); each bound is four standard errors
    assert abs(float(z.mean())) < 4 / n**0.5
    assert abs(float(z.var()) - 1) < 4 * (2 / n) ** 0.5
    assert abs(float((z**4).mean()) - 3) < 4 * (96 / n) ** 0.5
    # the processes draw independent streams: the two shards' noise is uncorrelated (a shared
    # stream would give each process the same numbers: correlation 1)
    m = min(z0.numel(), z1.numel())
    a, b = z0[:m] - z0[:m].mean(), z1[:m] - z1[:m].mean()
    correlation = float((a * b).sum() / (a.norm() * b.norm()))
    assert abs(correlation) < 4 / m**0.5
