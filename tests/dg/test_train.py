"""Training runs: every algorithm on every embedded data set, the record layout, bad input."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from torchsage.dg.algorithms import ALGORITHMS
from torchsage.dg.datasets import environment_names, get_dataset, seed_hash, split_environment
from torchsage.dg.hparams import default_hparams, random_hparams
from torchsage.dg.train import TrainArgs, train

TINY = '{"cnn_width": 8, "batch_size": 8}'
TINY_IMAGES = {"backbone": "mnist_cnn", "cnn_width": 8, "batch_size": 4, "image_size": 12}


def tiny_pacs(data_dir, corrupt=None):
    """A PACS folder of 4 domains x 2 classes x 5 random 10x10 images (PNG and JPEG)."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for domain in environment_names("PACS"):
        for label in ("dog", "house"):
            folder = data_dir / "PACS" / domain / label
            folder.mkdir(parents=True)
            for k in range(5):
                pixels = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(folder / f"{k}.{'png' if k % 2 else 'jpg'}")
    if corrupt is not None:
        bad = data_dir / "PACS" / corrupt / "dog" / "broken.jpg"
        bad.write_bytes(b"not an image at all")
        return bad
    return None


@pytest.mark.parametrize("dataset", ["RotatedDigits", "ColoredDigits", "PACS"])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_trains_on_every_tiny_dataset(algorithm, dataset, tmp_path):
    hparams = dict(TINY_IMAGES) if dataset == "PACS" else json.loads(TINY)
    data_dir = None
    if dataset == "PACS":
        tiny_pacs(tmp_path / "data")
        data_dir = str(tmp_path / "data")
    if algorithm == "Fishr":
        hparams["penalty_anneal_iters"] = 2  # exercise the penalty and the optimizer reset
    if algorithm in ("IRM", "VREx"):
        hparams[f"{algorithm.lower()}_penalty_anneal_iters"] = 2
    if algorithm == "SANDMask":
        hparams["tau"] = 0.5  # DomainBed's default 1.0 masks everything
    if algorithm == "GGA":  # a short search in the first two steps
        hparams.update(gga_start_step=0, gga_end_step=1, gga_search_steps=2, gga_neighborhood=0.01)
    out = train(
        TrainArgs(
            dataset=dataset,
            algorithm=algorithm,
            test_envs=[0],
            output_dir=str(tmp_path / "run"),
            data_dir=data_dir,
            steps=4,
            checkpoint_freq=2,
            hparams=json.dumps(hparams),
            progress=False,
            num_workers=0,  # DomainBed's 8 loader processes would dominate these tiny runs
        )
    )
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (out / "done").exists()  # steps 0, 2 and the last, 3
    record = json.loads(lines[-1])
    assert math.isfinite(record["loss"])
    if algorithm.startswith("SAGE"):
        assert record["disagreement"] > 0


def test_record_layout_follows_domainbed(tmp_path):
    out = train(
        TrainArgs(
            dataset="ColoredDigits",
            algorithm="SAGE",
            test_envs=[2],
            output_dir=str(tmp_path / "run"),
            steps=6,
            checkpoint_freq=2,
            hparams_seed=3,
            trial_seed=1,
            seed=7,
            hparams=TINY,
            save_model=True,
            progress=False,
        )
    )
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # DomainBed's checkpoints: step % checkpoint_freq == 0, and the last step (0-based)
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    r = records[-1]
    for i in range(3):
        assert 0.0 <= r[f"env{i}_in_acc"] <= 1.0 and 0.0 <= r[f"env{i}_out_acc"] <= 1.0
    assert r["args"]["dataset"] == "ColoredDigits" and r["args"]["algorithm"] == "SAGE"
    assert r["args"]["test_envs"] == [2]
    assert (r["args"]["hparams_seed"], r["args"]["trial_seed"], r["args"]["seed"]) == (3, 1, 7)
    expected = random_hparams("SAGE", "ColoredDigits", 3) | json.loads(TINY)
    assert r["hparams"] == expected
    assert {"disagreement", "noise_std", "loss", "epoch"} <= set(r)
    saved = torch.load(out / "model.pt", weights_only=False)
    assert saved["num_classes"] == 2 and "model" in saved


def test_runs_are_reproducible_from_their_seeds(tmp_path):
    def run(name):
        args = TrainArgs("RotatedDigits", "SAGE", [5], str(tmp_path / name), steps=3, hparams=TINY, seed=4)
        args.progress = False
        return json.loads((train(args) / "results.jsonl").read_text().splitlines()[-1])

    a, b = run("a"), run("b")
    assert a["env5_in_acc"] == b["env5_in_acc"] and a["loss"] == b["loss"]


def test_in_out_splits_follow_the_holdout_fraction_and_the_trial_seed():
    env = get_dataset("RotatedDigits").environments[0]
    part_in, part_out = split_environment(env, 0.2, seed_hash(0, 0))
    assert len(part_out) == int(0.2 * len(env)) and len(part_in) + len(part_out) == len(env)
    assert not set(part_in.indices) & set(part_out.indices)
    other_in, _ = split_environment(env, 0.2, seed_hash(1, 0))
    assert other_in.indices != part_in.indices


def test_hparams_registry_defaults_and_seeded_search():
    assert random_hparams("SAGE", "RotatedDigits", 0) == default_hparams("SAGE", "RotatedDigits")
    draw = random_hparams("SAGE", "RotatedDigits", 5)
    assert draw == random_hparams("SAGE", "RotatedDigits", 5)
    assert draw != random_hparams("SAGE", "RotatedDigits", 6)
    assert 10**-4.5 <= draw["lr"] <= 10**-2.5 and 8 <= draw["batch_size"] <= 512
    assert 1e-4 <= draw["gamma"] <= 1e-2 and draw["disagreement"] in ("normalized_std", "cosine")
    assert default_hparams("SAGE_AlignmentOnly", "PACS")["rho"] == 0.0
    assert default_hparams("ERM", "PACS")["backbone"] == "resnet50"
    # every algorithm has hparams for every data set
    for algorithm in ALGORITHMS:
        for dataset in ("RotatedDigits", "PACS"):
            assert "lr" in random_hparams(algorithm, dataset, 2)


def test_environment_names():
    assert environment_names("PACS") == ["art_painting", "cartoon", "photo", "sketch"]
    assert len(environment_names("RotatedDigits")) == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "MNIST", "--algorithm", "ERM", "--test-envs", "0"], "unknown dataset 'MNIST'"),
        (["--dataset", "PACS", "--algorithm", "DANN", "--test-envs", "0"], "unknown algorithm 'DANN'"),
        (
            ["--dataset", "ColoredDigits", "--algorithm", "ERM", "--test-envs", "3"],
            "test environment 3 out of range",
        ),
        (["--dataset", "PACS", "--algorithm", "ERM", "--test-envs", "0"], "--data-dir"),
        (
            ["--dataset", "PACS", "--algorithm", "ERM", "--test-envs", "0", "--data-dir", "/nonexistent/x"],
            "/nonexistent/x",
        ),
        (
            ["--dataset", "ColoredDigits", "--algorithm", "ERM", "--test-envs", "0", "--hparams", "{lr: 1}"],
            "not valid JSON",
        ),
        (
            [
                "--dataset",
                "ColoredDigits",
                "--algorithm",
                "ERM",
                "--test-envs",
                "0",
                "--hparams",
                '{"rho": 1}',
            ],
            "unknown hyperparameter",
        ),
    ],
)
def test_bad_input_exits_nonzero_with_one_clear_line(argv, message, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torchsage", "dg", "train", *argv, "--output-dir", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (out / "results.jsonl").exists()


def test_a_corrupt_image_stops_the_run_with_one_line_and_no_results(tmp_path):
    bad = tiny_pacs(tmp_path / "data", corrupt="sketch")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            *[sys.executable, "-m", "torchsage", "dg", "train", "--dataset", "PACS", "--algorithm", "SAGE"],
            *["--test-envs", "0", "--data-dir", str(tmp_path / "data"), "--output-dir", str(out)],
            *["--hparams", json.dumps(TINY_IMAGES), "--steps", "2", "--no-progress"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], proc.stderr
    assert not (out / "results.jsonl").exists()
