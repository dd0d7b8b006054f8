"""Distributed SAGE and SAM: 2 processes (gloo, CPU) under torchrun against the single-process run
on the union of the shards, replicas bit for bit, the noise seed, non-finite agreement, DDP, and
the bytes all-reduced against the hand-counted payload."""

import importlib.util
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchrun_launch

import torchsage
from torchsage.optim import LAYOUTS, make_data_parallel

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("dist_worker", HERE / "dist_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

RUNNABLE = [
    n
    for n in worker.SCENARIOS
    if not (worker.SCENARIOS[n].get("unequal") or worker.SCENARIOS[n].get("refused"))
]


def torchrun(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """2 processes on this machine; --standalone picks a free port for the rendezvous."""
    return torchrun_launch.torchrun([str(script), *args], timeout=timeout)[0]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = torchrun(HERE / "dist_worker.py", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {
        name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in (0, 1)]
        for name in worker.SCENARIOS
    }
    results["threads_left"] = [torch.load(out / f"threads_left.rank{r}.pt") for r in (0, 1)]
    return results


def test_session_teardown_leaves_no_thread_running(results):
    # The worker builds optimizers and DistributedDataParallel wrappers inside torchrun_session; when
    # the session ends, the group must be destroyed, not merely unregistered: before the library
    # imported torch.distributed.nn ahead of init_process_group, that module's default arguments
    # (imported through torch._dynamo by the first optimizer) kept the group, and its gloo threads
    # (gloo_tcp_loop, pt_gloo_runloop x2) ran on into interpreter shutdown, where a rank now and
    # then aborted ("terminate called without an active exception").
    if not Path("/proc/self/task").is_dir():
        pytest.skip("thread listing needs /proc (Linux)")
    assert results["threads_left"] == [[], []]


@pytest.mark.parametrize("name", RUNNABLE)
def test_matches_single_process_on_the_union(results, name):
    ranks = results[name]
    reference = worker.run(name, None, 1)
    for rank in ranks:
        # SGD carries the float32 rounding of the shard average against the union's sum (8 terms:
        # ~sqrt(8) * 2**-24 = 2e-7 relative) into the weights as lr * dg: 3 steps stay near 1e-6
        for p, q in zip(rank["params"], reference["params"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the scenario moves the weights well beyond the tolerance, so a wrong reduction shows
    torch.manual_seed(100)
    start = worker.build_model(worker.SCENARIOS[name])
    moved = max(float((p - q.detach()).abs().max()) for p, q in zip(reference["params"], start.parameters()))
    assert moved > 1e-2
    expected_skips = [s == 1 and bool(worker.SCENARIOS[name].get("nan")) for s in range(worker.STEPS)]
    for rank in ranks:
        assert [i["skipped"] for i in rank["infos"]] == expected_skips
        for mine, ref in zip(rank["infos"], reference["infos"]):
            if not math.isnan(ref["disagreement"]):
                # float64 statistics of float32 gradients that differ by ~2e-7 relative (see above),
                # times a condition number of a few: 1e-5
                assert mine["disagreement"] == pytest.approx(ref["disagreement"], rel=1e-5)
            if worker.SCENARIOS[name]["layout"] == "shards" and not mine["skipped"]:
                # the union's losses: a float32 mean of 8 cross-entropies in two orders, a few ulp
                # (1.2e-7 each), at weights equal to ~1e-6: 1e-6
                assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-6)


@pytest.mark.parametrize("name", RUNNABLE)
def test_replicas_are_bit_identical(results, name):
    r0, r1 = results[name]
    assert all(torch.equal(p, q) for p, q in zip(r0["params"], r1["params"]))
    if worker.SCENARIOS[name]["opt"].startswith("SAGE"):
        # seed=None: rank 1 started from torch.initial_seed() = 101; rank 0's 100 wins
        assert r0["seed"] == r1["seed"] == 100
    if worker.SCENARIOS[name]["kw"].get("gamma", 0) > 0:
        assert r0["generators"].keys() == r1["generators"].keys() == {"cpu"}
        assert torch.equal(r0["generators"]["cpu"], r1["generators"]["cpu"])
        noise = [i["noise_std"] for i in r0["infos"] if not i["skipped"]]
        assert noise == [i["noise_std"] for i in r1["infos"] if not i["skipped"]] and min(noise) > 0


def _union_gradients(name):
    torch.manual_seed(100)
    model = worker.build_model(worker.SCENARIOS[name])
    rows = []
    for x, y in worker.data():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy())
    return np.stack(rows)


@pytest.mark.parametrize(
    ("name", "measure"),
    [
        ("sage_shards", "normalized_std"),
        ("sage_domains", "normalized_std"),
        ("sage_domains_cosine", "cosine"),
    ],
)
def test_first_disagreement_against_brute_force(results, name, measure):
    g = _union_gradients(name)
    mean = g.mean(0)
    if measure == "cosine":
        u = g / np.linalg.norm(g, axis=1, keepdims=True)
        expected = 1 - ((u @ u.T).sum() - len(g)) / (len(g) * (len(g) - 1))
    else:
        expected = np.sqrt(np.square(g - mean).sum(1).mean()) / np.linalg.norm(mean)
    for rank in results[name]:
        # float32 gradients (~1e-7 relative) against a float64 brute force: 1e-5
        assert rank["infos"][0]["disagreement"] == pytest.approx(expected, rel=1e-5)


def test_bytes_reduced_match_the_payload(results):
    n = 4 * 8 + 8 + 8 * 3 + 3  # parameters of the 4-8-3 network
    P, K = 4, worker.K
    flags = 8 * (3 + P)  # float64 [K, K^2, non-finite count, present flags]
    # shards, streamed clean pass: [K, K^2] checked before the K stacked gradients, then the flags
    # and the losses (float64); perturbed pass: the flags, then the gradient with the K float32
    # losses appended. Domains: the flags, the merged mean and one float64 M2 (SAGE) on the clean
    # pass, the flags and the gradient on the perturbed one.
    clean = 16 + 4 * n * K + flags + 8 * K
    shards = clean + flags + 4 * (n + K)
    domains = flags + 4 * n + 8 + flags + 4 * n
    for rank in results["sage_shards"]:
        assert rank["bytes"] == worker.STEPS * shards
    for rank in results["sage_domains"]:
        assert rank["bytes"] == worker.STEPS * domains
    for rank in results["sage_shards_small_bucket"]:  # same bytes, one more collective per step
        assert rank["bytes"] == worker.STEPS * shards
        assert rank["calls"] == results["sage_shards"][0]["calls"] + worker.STEPS
    for rank in results["sage_shards_ddp"]:  # DDP reduced the perturbed gradient itself
        assert rank["bytes"] == worker.STEPS * (clean + flags + 8 * K)


def test_shards_with_different_counts_raise_on_every_process(results):
    for name in ("sam_shards_unequal", "sage_shards_unequal"):
        for rank in results[name]:
            assert "same number of losses on every process" in rank["error"]


def test_domains_layout_refuses_weights_on_every_process(results):
    for rank in results["sage_domains_weights"]:
        assert "not supported with layout='domains'" in rank["error"]


def test_arguments_are_checked():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="layout must be one of"):
        torchsage.SAGE(params, torch.optim.SGD, lr=0.1, layout="rows")
    with pytest.raises(ValueError, match="process_group must be 'auto'"):
        torchsage.SAM(params, torch.optim.SGD, lr=0.1, process_group="world")
    assert set(LAYOUTS) == {"shards", "domains"}
    # no initialized group: 'auto' and None both mean a plain single-process optimizer
    assert make_data_parallel("auto", "domains", None, None) is None
    assert torchsage.SAM(params, torch.optim.SGD, lr=0.1, process_group=None)._parallel is None


def test_micro_batches_add_no_collective(results):
    # each shard in two micro-batches: the gradients are accumulated locally and reduced once per
    # pass, so the payload is the whole-batch run's; under DDP the perturbed pass is reduced by the
    # optimizer (inside no_sync) instead of after every micro-batch's backward
    for name in ("sage_shards_ddp_micro", "sam_shards_micro"):
        whole = "sage_shards" if name.startswith("sage") else "sam_shards"
        for rank in results[name]:
            assert rank["bytes"] == results[whole][0]["bytes"]
            assert rank["calls"] == results[whole][0]["calls"]


def test_ddp_needs_no_find_unused_parameters(results):
    # a parameter no loss reaches: DDP without find_unused_parameters would wait for its gradient
    # (and fail on the next forward); the optimizer saw it missing at the clean pass and reduced the
    # perturbed pass itself. The parameter is left as it was.
    torch.manual_seed(100)
    start = worker.build_model(worker.SCENARIOS["sage_shards_ddp_unused"])
    for rank in results["sage_shards_ddp_unused"]:
        spare = rank["params"][-2:]
        assert torch.equal(spare[0], start.spare.weight.detach()) and torch.equal(
            spare[1], start.spare.bias.detach()
        )
