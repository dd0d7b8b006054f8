"""The study's pairing: for one trial every method and hyperparameter choice starts from the same
weights, the same in/out splits and the same minibatches (checked through the real training
function, not through the study's own bookkeeping)."""

import json

import pytest
import torch

import torchsage.dg.train as dg_train
from torchsage.study.spec import DG_CELLS, N_TRIALS, dg_arms, dg_jobs, part_jobs, trial_seed


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_every_arm_of_a_trial_shares_seed_and_split_seed(tmp_path):
    jobs = dg_jobs(tmp_path, cells=[("RotatedDigits", 0), ("ColoredDigits", 2)], n_trials=3)
    assert len(jobs) == 2 * 3 * (len(dg_arms()) - 1)  # SAGE (default) is a grid choice
    by_trial = {}
    for job in jobs:
        key = (job.settings["dataset"], job.settings["test_env"], job.settings["trial"])
        by_trial.setdefault(key, set()).add((_flag(job.argv, "--seed"), _flag(job.argv, "--trial-seed")))
    assert all(len(v) == 1 for v in by_trial.values())  # one (seed, split seed) per trial
    seeds = {next(iter(v))[0] for v in by_trial.values()}
    assert len(seeds) == len(by_trial)  # different trials and cells: different seeds
    assert len({j.output_dir for j in jobs}) == len(jobs)  # no two runs share a directory


def test_parts_cover_the_cells():
    total = sum(
        len(part_jobs("r", f"dg-{'rotated' if d == 'RotatedDigits' else 'colored'}-{e}")) for d, e in DG_CELLS
    )
    assert total == len(DG_CELLS) * N_TRIALS * (len(dg_arms()) - 1)
    with pytest.raises(ValueError, match="unknown part"):
        part_jobs("r", "dg-nope")


def test_training_shares_init_splits_and_batches_across_algorithms(tmp_path, monkeypatch):
    """ERM, SAM and SAGE with the study's seed: with lr 0 (and SAGE's noise off) the weights stay
    at their initialisation, so equal step-0 accuracies on every split mean equal initial weights
    and equal splits; the recorded minibatches are compared exactly."""
    seen = {}
    real = dg_train.infinite_batches

    def recording(data, batch_size, seed, *args, **kwargs):
        stream = real(data, batch_size, seed, *args, **kwargs)
        first = [next(stream) for _ in range(2)]
        seen.setdefault(current[0], []).append([(x.clone(), y.clone()) for x, y in first])

        def rest():
            yield from first
            yield from stream

        return rest()

    monkeypatch.setattr(dg_train, "infinite_batches", recording)
    current = [None]
    records = {}
    seed = trial_seed("RotatedDigits", 0, 0)
    for algorithm, extra in (("ERM", {}), ("SAM", {"rho": 0.05}), ("SAGE", {"gamma": 0.0})):
        current[0] = algorithm
        hp = {"cnn_width": 8, "batch_size": 8, "lr": 0.0, **extra}
        out = dg_train.train(
            dg_train.TrainArgs(
                dataset="RotatedDigits",
                algorithm=algorithm,
                test_envs=[0],
                output_dir=str(tmp_path / algorithm),
                steps=1,
                seed=seed,
                trial_seed=0,
                hparams=json.dumps(hp),
                progress=False,
            )
        )
        line = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        records[algorithm] = {k: v for k, v in line.items() if k.endswith("_acc")}
    assert records["ERM"] == records["SAM"] == records["SAGE"]
    assert len(set(records["ERM"].values())) > 1  # not a degenerate all-equal record
    for algorithm in ("SAM", "SAGE"):
        for env_a, env_b in zip(seen["ERM"], seen[algorithm]):
            for (xa, ya), (xb, yb) in zip(env_a, env_b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_default_arm_is_the_harness_default():
    from torchsage.dg.hparams import default_hparams
    from torchsage.study.spec import SAGE_DEFAULTS, SAGE_GRID, authors_dg_hparams

    defaults = default_hparams("SAGE", "RotatedDigits")
    assert {k: defaults[k] for k in SAGE_DEFAULTS} == SAGE_DEFAULTS
    assert SAGE_DEFAULTS in SAGE_GRID
    import torchsage

    preset = torchsage.preset("authors-dg")
    assert all(
        authors_dg_hparams()[k] == preset[k] for k in ("lr", "rho", "gamma", "rho_scaling", "disagreement")
    )


def test_mtl_runs_pair_by_seed_and_all_measure_delta_m(tmp_path):
    from torchsage.study.spec import mtl_jobs

    jobs = mtl_jobs(tmp_path, n_seeds=3)
    assert len({j.output_dir for j in jobs}) == len(jobs) == 3 * (1 + 3 * 4)
    for job in jobs:
        if job.settings["solver"] != "stl":
            assert "--stl-dir" in job.argv  # Delta-m% needs the single-task baselines
    seeds = {}
    for job in jobs:
        seeds.setdefault(job.settings["solver"], set()).add(int(_flag(list(job.argv), "--seed")))
    assert all(v == {0, 1, 2} for v in seeds.values())
    assert sum("--preset" in j.argv for j in jobs) == 3 * 3
