"""``--device`` of ``dg train`` and ``dg sweep``: every tensor of a run (parameters, buffers,
optimizer state, SAGE's noise generator, training and evaluation batches) on the requested device;
an unusable device is one line on stderr before anything is written.

Here the devices are those this machine has (the CPU; a GPU too where one is present, where the
same tests then check that nothing stays on the CPU).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from torchsage.cli import main
from torchsage.dg import sweep
from torchsage.dg.algorithms import ALGORITHMS
from torchsage.dg.train import TrainArgs, default_num_workers, resolve_device, tensor_devices, train

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TINY = {"cnn_width": 8, "batch_size": 8}
TINY_IMAGES = {"backbone": "mnist_cnn", "cnn_width": 8, "batch_size": 4, "image_size": 12}


class _Spy:
    """Records the devices of every batch an algorithm trains and predicts on, and of everything
    it holds after each step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        self.batches: set[torch.device] = set()
        self.predicted: set[torch.device] = set()
        self.held: dict[str, set[torch.device]] = {}
        self.steps = 0
        update, predict = cls.update, cls.predict
        spy = self

        def spied_update(algorithm, minibatches, step):
            for x, y in minibatches:
                spy.batches.update((x.device, y.device))
            out = update(algorithm, minibatches, step)
            spy.steps += 1
            for key, devices in tensor_devices(algorithm).items():
                spy.held.setdefault(key, set()).update(devices)
            return out

        def spied_predict(algorithm, x):
            spy.predicted.add(x.device)
            return predict(algorithm, x)

        monkeypatch.setattr(cls, "update", spied_update)
        monkeypatch.setattr(cls, "predict", spied_predict)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_tensor_of_a_run_is_on_the_requested_device(algorithm, device, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch, ALGORITHMS[algorithm])
    hparams = dict(TINY)
    if algorithm == "Fishr":
        hparams["penalty_anneal_iters"] = 1  # the optimizer is rebuilt mid-run: still on the device
    train(
        TrainArgs(
            "RotatedDigits",
            algorithm,
            [0],
            str(tmp_path / "run"),
            steps=3,
            checkpoint_freq=2,
            hparams=json.dumps(hparams),
            progress=False,
            device=device,
        )
    )
    want = {torch.device(device)}
    if want == {torch.device("cuda")}:
        want = {torch.device("cuda", torch.cuda.current_device())}
    assert spy.steps == 3
    assert spy.batches == want and spy.predicted == want
    assert spy.held["parameters"] == want and spy.held["buffers"] <= want
    assert spy.held["optimizer state"] == want  # Adam's moments exist after a step
    if algorithm in ("SAGE", "SAGE_AlignmentOnly"):  # the ones that add noise (gamma > 0)
        assert spy.held["noise generators"] == want
    else:
        assert spy.held["noise generators"] <= want
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])
    assert torch.device(record["args"]["device"]) in want


def test_image_folders_load_in_worker_processes_onto_the_device(tmp_path, monkeypatch):
    from test_train import tiny_pacs  # tests/dg is on the path (a dependency ships a package named tests)

    tiny_pacs(tmp_path / "data")
    spy = _Spy(monkeypatch, ALGORITHMS["SAGE"])
    device = DEVICES[-1]
    out = train(
        TrainArgs(
            "PACS",
            "SAGE",
            [0],
            str(tmp_path / "run"),
            data_dir=str(tmp_path / "data"),
            steps=2,
            hparams=json.dumps(TINY_IMAGES),
            progress=False,
            num_workers=2,
            device=device,
        )
    )
    assert spy.steps == 2 and len(spy.batches) == 1 and spy.batches == spy.predicted
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["args"]["num_workers"] == 2


def test_default_workers_follow_domainbed():
    cpus = len(__import__("os").sched_getaffinity(0)) if sys.platform == "linux" else None
    assert default_num_workers("RotatedDigits") == 0 and default_num_workers("ColoredDigits") == 0
    if cpus is not None:
        assert default_num_workers("PACS") == min(8, cpus)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, message in [
        ("meta", "--device meta holds no data"),
        ("gpu0", "--device 'gpu0' is not a device name"),
        ("cuda:99", "--device cuda:99 is not available on this machine"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_device(name)


UNUSABLE = ["cuda:99", "meta", "nonsense"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", UNUSABLE)
def test_an_unusable_device_is_one_line_and_nothing_written(device, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["dg", "train", "--dataset", "ColoredDigits", "--algorithm", "ERM", "--test-envs", "0"]
    code = main([*argv, "--output-dir", str(out), "--device", device, "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("torchsage: error: --device"), lines
    assert not out.exists()


def _fake(dataset: str) -> list[str]:
    return {"Two": ["x", "y"]}[dataset]


def test_the_sweep_passes_the_device_to_every_run_and_keeps_the_run_ids(tmp_path):
    fake = dict(env_names=_fake, algorithm_names=lambda: ["ERM"])
    plain = sweep.make_jobs(tmp_path, "Two", "ERM", 1, 2, **fake)
    on_gpu = sweep.make_jobs(tmp_path, "Two", "ERM", 1, 2, device="cuda:1", **fake)
    assert len(on_gpu) == 4
    for a, b in zip(plain, on_gpu):
        assert "--device" not in a.command()  # each run then takes cuda where it finds one
        argv = b.command()
        assert argv[argv.index("--device") + 1] == "cuda:1"
        assert a.run_id == b.run_id  # the same run, wherever it trains


def test_sweep_checks_the_device_here_for_local_runs_and_by_name_for_slurm(tmp_path, capsys):
    base = ["dg", "sweep", "--datasets", "ColoredDigits", "--algorithms", "ERM", "--n-hparams", "1"]
    base += ["--n-trials", "1", "--output-dir", str(tmp_path / "s"), "--dry-run"]
    assert main([*base, "--device", "cuda:99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda:99 is not available on this machine" in err[0]
    assert main([*base, "--device", "meta", "--launcher", "submitit"]) == 2
    assert "--device meta holds no data" in capsys.readouterr().err
    pytest.importorskip("submitit")
    # a login node without a GPU submits cuda runs: the name is checked, each node checks its card
    assert main([*base, "--device", "cuda:99", "--launcher", "submitit"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--device cuda:99") == 3  # one run per test environment


@pytest.mark.parametrize("algorithm", ["ERM", "SAGE", "Fishr"])
@pytest.mark.parametrize("schedule", ["none", "step", "cosine"])
def test_lr_schedule_reaches_the_optimizer_every_step(algorithm, schedule, tmp_path, monkeypatch):
    import math

    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen: list[tuple[int, float]] = []  # (training step, lr) of every optimizer step taken
    now = [-1]
    cls = ALGORITHMS[algorithm]
    update = cls.update

    def spied(self, minibatches, step):
        now[0] = step
        return update(self, minibatches, step)

    monkeypatch.setattr(cls, "update", spied)
    hook = register_optimizer_step_post_hook(lambda opt, *_: seen.append((now[0], opt.param_groups[0]["lr"])))
    lr, steps = 1e-3, 10
    hparams = {**TINY, "lr": lr, "lr_schedule": schedule, "penalty_anneal_iters": 4}
    if algorithm != "Fishr":
        del hparams["penalty_anneal_iters"]
    try:
        out = train(
            TrainArgs(
                "ColoredDigits",
                algorithm,
                [0],
                str(tmp_path / "run"),
                steps=steps,
                checkpoint_freq=1,
                hparams=json.dumps(hparams),
                progress=False,
                device="cpu",
            )
        )
    finally:
        hook.remove()
    # by hand: step x0.1 from step round(0.8 * 10) = 8 on; cosine (1 + cos(pi s / 10)) / 2
    expected = {
        "none": [lr] * steps,
        "step": [lr] * 8 + [lr / 10] * 2,
        "cosine": [lr * (1 + math.cos(math.pi * s / steps)) / 2 for s in range(steps)],
    }[schedule]
    recorded = [json.loads(line)["lr"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert recorded == pytest.approx(expected, rel=1e-12)
    # every optimizer step (the base one inside SAGE's, Fishr's rebuilt one) took the scheduled lr
    assert sorted({s for s, _ in seen}) == list(range(steps))
    for s, lr_taken in seen:
        assert lr_taken == pytest.approx(expected[s], rel=1e-12), (s, lr_taken)


def test_unknown_lr_schedule_is_one_line(tmp_path, capsys):
    argv = ["dg", "train", "--dataset", "ColoredDigits", "--algorithm", "ERM", "--test-envs", "0"]
    code = main([*argv, "--output-dir", str(tmp_path / "r"), "--hparams", '{"lr_schedule": "linear"}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lr_schedule must be one of none, step, cosine" in err[0]
