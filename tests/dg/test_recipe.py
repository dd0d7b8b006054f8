"""``--preset authors`` / ``authors-domainbed``: the SAGE authors' DG recipe in the harness.

The preset's optimizer step itself is checked against the authors' equations in
tests/optim/test_fidelity.py; here: the harness gives SAGE exactly that optimizer, one merged
batch split by domain with the sizes as weights, BatchNorm on both passes, the step schedule, the
records' labels, and the sweep's two variants.
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import torchsage
from torchsage.cli import main
from torchsage.dg import sweep
from torchsage.dg.algorithms import ALGORITHMS
from torchsage.dg.batches import merged_batches
from torchsage.dg.hparams import default_hparams
from torchsage.dg.recipe import AuthorsSAGE, preset_hparams
from torchsage.dg.train import TrainArgs, train

TINY = {"cnn_width": 8}


def test_preset_hparams_are_the_authors_dg_optimizer():
    kwargs = torchsage.preset("authors-dg")
    for name in ("authors", "authors-domainbed"):
        hp = preset_hparams(name, "PACS")
        assert hp["optimizer"] == "sgd" and kwargs["base_optimizer"] is torch.optim.SGD
        for key in ("lr", "weight_decay", "rho", "rho_scaling", "disagreement", "gamma", "ns_steps"):
            assert hp[key] == kwargs[key], key
    recipe = preset_hparams("authors", "PACS")
    assert (recipe["merged_batch"], recipe["lr_schedule"], recipe["batch_size"], recipe["freeze_bn"]) == (
        True,
        "step",
        32,
        False,
    )
    assert "merged_batch" not in preset_hparams("authors-domainbed", "PACS")
    assert "freeze_bn" not in preset_hparams("authors", "RotatedDigits")  # GroupNorm CNN: no BatchNorm
    with pytest.raises(ValueError, match="unknown --preset 'mine'"):
        preset_hparams("mine", "PACS")


def test_the_recipe_step_is_the_preset_optimizer_on_the_merged_batch():
    hp = {**default_hparams("SAGE", "RotatedDigits"), **TINY, **preset_hparams("authors", "RotatedDigits")}
    torch.manual_seed(3)
    algorithm = AuthorsSAGE((1, 16, 16), 10, 3, hp)
    opt = algorithm.optimizer
    assert opt.update_bn_on_perturbed and opt.model is algorithm.network
    reference = copy.deepcopy(algorithm.network)  # the same initial weights
    # the preset's optimizer itself (SGD, Muon float32 polar, cosine D, gamma 1.0), same noise seed
    ref_opt = torchsage.SAGE(
        reference.parameters(), **torchsage.preset("authors-dg"), model=reference, seed=opt.seed
    )
    sizes = [5, 0, 11]  # a domain that drew nothing is left out of the step
    batches = [(torch.rand(n, 1, 16, 16), torch.randint(0, 10, (n,))) for n in sizes]
    for step in range(3):
        algorithm.update(batches, step)
        present = [b for b in batches if len(b[1])]
        x, y = torch.cat([b[0] for b in present]), torch.cat([b[1] for b in present])
        cuts = list(itertools.accumulate([0, *(len(b[1]) for b in present)]))

        def closure(x=x, y=y, cuts=cuts):
            out = reference(x)
            return [F.cross_entropy(out[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]

        ref_opt.step(closure, weights=[len(b[1]) for b in present])
    # the same operations in the same order: equal to float rounding of identical arithmetic
    for p, q in zip(algorithm.network.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_merged_batches_split_the_union_by_domain():
    from torch.utils.data import Subset, TensorDataset

    sets = [
        Subset(TensorDataset(torch.full((n, 1), float(k)), torch.arange(n)), list(range(n)))
        for k, n in enumerate((3, 9, 20))
    ]
    stream = merged_batches(sets, 16, seed=0, num_workers=0)
    counts = torch.zeros(3)
    for _ in range(200):
        parts = next(stream)
        assert len(parts) == 3 and sum(len(y) for _, y in parts) == 16
        for k, (x, y) in enumerate(parts):
            assert torch.all(x == k) and torch.all(y < len(sets[k]))
            counts[k] += len(y)
    # drawn uniformly from the union: each domain's share of the examples is n_k / N = 3/32, 9/32, 20/32
    # (3200 draws: a standard deviation of at most sqrt(3200 / 4) = 28 examples per domain)
    assert torch.all((counts - 3200 * torch.tensor([3, 9, 20]) / 32).abs() < 5 * 28)


def test_dg_train_preset_authors_records_the_recipe(tmp_path, monkeypatch):
    sizes = []
    update = AuthorsSAGE.update

    def spied(self, minibatches, step):
        sizes.append(sum(len(y) for _, y in minibatches))
        return update(self, minibatches, step)

    monkeypatch.setattr(AuthorsSAGE, "update", spied)
    out = train(
        TrainArgs(
            "RotatedDigits",
            "sage",  # any case, as --algorithm takes it
            [0],
            str(tmp_path / "run"),
            steps=10,
            checkpoint_freq=4,
            hparams=json.dumps({**TINY, "gamma": 0.0}),  # --hparams overrides the preset
            progress=False,
            preset="authors",
        )
    )
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4, 8, 9]
    assert sizes == [32] * 10  # one merged batch of 32 per step
    last = records[-1]
    assert last["args"]["algorithm"] == "SAGE@authors" and last["args"]["preset"] == "authors"
    assert last["hparams"]["lr"] == 2e-3 and last["hparams"]["gamma"] == 0.0
    assert last["hparams"]["merged_batch"] is True
    assert [r["lr"] for r in records] == pytest.approx([2e-3, 2e-3, 2e-4, 2e-4])  # x0.1 from step 8


def test_preset_errors_are_one_line(tmp_path, capsys):
    base = [
        "dg",
        "train",
        "--dataset",
        "ColoredDigits",
        "--test-envs",
        "0",
        "--output-dir",
        str(tmp_path / "r"),
    ]
    for extra, message in [
        (["--algorithm", "ERM", "--preset", "authors"], "use it with --algorithm SAGE, not ERM"),
        (["--algorithm", "SAGE", "--hparams", '{"merged_batch": true}'], "use --preset authors"),
    ]:
        assert main([*base, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "r").exists()


def test_sweep_preset_authors_runs_both_variants_of_sage_only(tmp_path):
    fake = dict(env_names=lambda d: ["x", "y"], algorithm_names=lambda: list(ALGORITHMS))
    jobs = sweep.make_jobs(tmp_path, "Two", ["ERM", "SAGE"], 1, 1, preset="authors", **fake)
    plain = sweep.make_jobs(tmp_path, "Two", ["ERM", "SAGE"], 1, 1, **fake)
    by = {(j.algorithm, j.preset, j.test_envs) for j in jobs}
    assert len(jobs) == 6 and by == {
        (a, p, (t,))
        for t in (0, 1)
        for a, p in [("ERM", None), ("SAGE", "authors"), ("SAGE", "authors-domainbed")]
    }
    ids = {j.run_id for j in jobs}
    assert len(ids) == 6 and {j.run_id for j in plain if j.algorithm == "ERM"} <= ids
    recipe = next(j for j in jobs if j.preset == "authors")
    argv = recipe.command()
    assert argv[argv.index("--preset") + 1] == "authors" and "SAGE@authors" in recipe.describe()


def test_cli_sweep_preset_reaches_every_sage_command(tmp_path, capsys):
    argv = [
        "dg",
        "sweep",
        "--datasets",
        "ColoredDigits",
        "--algorithms",
        "ERM",
        "SAGE",
        "--preset",
        "authors",
    ]
    argv += ["--n-hparams", "1", "--n-trials", "1", "--test-envs", "0", "--output-dir", str(tmp_path / "s")]
    assert main([*argv, "--dry-run"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if " dg train " in line]
    assert len(commands) == 3  # ERM once, SAGE under each preset
    assert sum("--preset authors-domainbed" in c for c in commands) == 1
    assert sum(c.endswith("--preset authors --no-progress") for c in commands) == 1
