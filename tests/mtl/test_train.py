"""Training runs: records, evaluation against a hand recomputation, stl baselines and Delta-m%,
the dense benchmarks on generated arrays, diagnostics loading, the sweep plan, bad input."""

import json
import math

import pytest
import torch
from torch import nn

from torchsage.cli import main
from torchsage.mtl.checkpoint import load_for_diagnostics
from torchsage.mtl.data import multi_digits, write_fake_cityscapes, write_fake_nyuv2
from torchsage.mtl.metrics import BASELINES, HIGHER_IS_BETTER
from torchsage.mtl.sweep import make_jobs, sweep
from torchsage.mtl.train import MTLArgs, train

pytest.importorskip("torchjd")


TINY = ["--n-train", "48", "--n-test", "40", "--batch-size", "16", "--no-progress"]


def _records(path):
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


def test_cli_train_writes_records_and_the_recorded_accuracy_matches_the_saved_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["mtl", "train", "--benchmark", "multidigits", "--solver", "upgrad", "--sage",
                 "--epochs", "1", "--output-dir", str(out), "--save-model", *TINY])  # fmt: skip
    assert code == 0 and "results.jsonl" in capsys.readouterr().out
    (record,) = _records(out)
    assert (out / "done").exists() and (out / "model.pt").exists()
    assert (
        record["epoch"] == 1 and record["args"]["method"] == "sage" and record["args"]["solver"] == "upgrad"
    )
    assert record["args"]["rho"] == 0.05 and record["args"]["gamma"] == 1e-3
    assert record["delta_m"] is None  # no stl runs given
    assert record["disagreement"] > 0 and record["noise_std"] == pytest.approx(1e-3 * record["disagreement"])
    assert all(math.isfinite(record[k]) for k in ("loss/left", "loss/right", "wall_time"))
    # recompute the test accuracy of the saved model by hand
    payload = torch.load(out / "model.pt", weights_only=False)
    from torchsage.mtl.networks import MultiLeNet

    net = MultiLeNet(width=payload["width"])
    net.load_state_dict(payload["model"])
    net.eval()
    x, left, right = multi_digits("test", n=40).tensors
    with torch.no_grad():
        pred = net(x)
    assert record["left/acc"] == pytest.approx((pred["left"].argmax(1) == left).float().mean().item())
    assert record["right/acc"] == pytest.approx((pred["right"].argmax(1) == right).float().mean().item())


def _args(tmp_path, name, **kw):
    base = dict(benchmark="multidigits", output_dir=str(tmp_path / name), epochs=1, n_train=48, n_test=40,
                batch_size=16, progress=False)  # fmt: skip
    base.update(kw)
    return MTLArgs(**base)


def test_runs_are_deterministic_given_the_seed(tmp_path):
    a = _records(train(_args(tmp_path, "a", solver="pcgrad", sage=True, seed=3)))[0]
    b = _records(train(_args(tmp_path, "b", solver="pcgrad", sage=True, seed=3)))[0]
    c = _records(train(_args(tmp_path, "c", solver="pcgrad", sage=True, seed=4)))[0]
    for r in (a, b, c):
        r.pop("wall_time")
        r["args"].pop("seed")
    assert a == b and a != c


def test_stl_baseline_gives_delta_m_by_hand(tmp_path):
    stl = _records(train(_args(tmp_path, "stl/s0", solver="stl")))[0]
    assert set(stl) >= {"left/acc", "right/acc", "loss/left", "loss/right"} and stl["args"]["solver"] == "stl"
    run = _records(train(_args(tmp_path, "ls", solver="ls", stl_dir=str(tmp_path / "stl"))))[0]
    by_hand = 50.0 * sum(
        -(run[k] - stl[k]) / stl[k] for k in ("left/acc", "right/acc")
    )  # higher is better for both accuracies
    assert run["delta_m"] == pytest.approx(by_hand)


def test_dwa_is_stepped_once_per_epoch(tmp_path, monkeypatch):
    from torchjd.scalarization import DWA

    calls = []
    real = DWA.step
    monkeypatch.setattr(DWA, "step", lambda self: (calls.append(1), real(self)))
    train(_args(tmp_path, "dwa", solver="dwa", epochs=3))
    assert len(calls) == 3


def test_uw_log_variances_are_optimised_in_training(tmp_path, monkeypatch):
    from torchjd.scalarization import UW

    made = []
    real_init = UW.__init__
    monkeypatch.setattr(
        UW, "__init__", lambda self, *a, **k: (real_init(self, *a, **k), made.append(self))[0]
    )
    train(_args(tmp_path, "uw", solver="uw"))
    (uw,) = made
    assert torch.all(uw.log_var.detach() != 0)


@pytest.mark.parametrize("benchmark", ["nyuv2", "cityscapes"])
def test_dense_benchmarks_train_on_generated_arrays(tmp_path, benchmark):
    writer = write_fake_nyuv2 if benchmark == "nyuv2" else write_fake_cityscapes
    root = writer(tmp_path / "data", n=2, size=(32, 48))
    out = train(MTLArgs(benchmark=benchmark, solver="imtlg", sage=True, output_dir=str(tmp_path / "run"),
                        epochs=1, data_dir=str(root), width=4, progress=False, save_model=True))  # fmt: skip
    (record,) = _records(out)
    baseline = BASELINES[benchmark]
    assert set(baseline) <= set(record)
    by_hand = (
        100.0
        / len(baseline)
        * sum((-1 if HIGHER_IS_BETTER[k] else 1) * (record[k] - v) / v for k, v in baseline.items())
    )
    assert record["delta_m"] == pytest.approx(by_hand)
    assert record["args"]["batch_size"] == (2 if benchmark == "nyuv2" else 8) and record["lr"] == 1e-4
    model, batches, loss_fns = load_for_diagnostics(out, batch_size=2)
    tasks = record["args"]["tasks"]
    assert len(batches) == len(loss_fns) == len(tasks) == (3 if benchmark == "nyuv2" else 2)
    x, target = batches[0]
    assert loss_fns[0](model(x), target).item() == pytest.approx(
        __import__("torchsage.mtl.metrics")
        .mtl.metrics.segmentation_loss(model(x)["segmentation"], target)
        .item()
    )


def test_load_for_diagnostics_gives_one_batch_and_loss_per_task(tmp_path):
    out = train(_args(tmp_path, "run", solver="mgda", save_model=True))
    model, batches, loss_fns = load_for_diagnostics(out, batch_size=8)
    assert not model.training and len(batches) == len(loss_fns) == 2
    (xl, yl), (xr, yr) = batches
    assert xl.shape == (8, 1, 28, 28) and torch.equal(xl, xr)
    output = model(xl)
    assert loss_fns[0](output, yl).item() == pytest.approx(
        nn.functional.cross_entropy(output["left"], yl).item()
    )
    assert loss_fns[1](output, yr).item() == pytest.approx(
        nn.functional.cross_entropy(output["right"], yr).item()
    )
    # the left labels are the true left digits of the drawn images
    x, left, right = multi_digits("train", n=48).tensors
    idx = [int(torch.nonzero((x == img).flatten(1).all(1))[0]) for img in xl]
    assert torch.equal(left[idx], yl) and torch.equal(right[idx], yr)
    _, two, _ = load_for_diagnostics(out / "model.pt", n_batches=2, batch_size=8)
    assert len(two[0]) == 2 and two[0][0][0].shape == (8, 1, 28, 28)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_for_diagnostics(tmp_path / "nowhere")


def test_sweep_plan_skips_finished_runs_and_passes_the_stl_folder(tmp_path, capsys):
    jobs = make_jobs(tmp_path, "multidigits", ["stl", "ls"], ["plain", "sage"], [0, 1], ["--epochs", "2"])
    done = next(
        j
        for j in jobs
        if (j.settings["solver"], j.settings["method"], j.settings["seed"]) == ("ls", "sage", 1)
    )
    done = done.output_dir
    done.mkdir(parents=True)
    (done / "done").write_text("done\n")
    sweep(benchmark="multidigits", solvers=["stl", "ls"], methods=["plain", "sage"], seeds=[0, 1],
          output_dir=str(tmp_path), dry_run=True, train_options=["--epochs", "2"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 3  # stl x 2 seeds (plain only), ls x 2 methods x 2 seeds - 1 finished
    assert all("--epochs 2" in line for line in lines)
    assert "--solver stl" in lines[0] and "--stl-dir" not in lines[0]
    assert all(f"--stl-dir {tmp_path / 'multidigits' / 'stl'}" in line for line in lines[2:])
    assert sum("--sage" in line for line in lines) == 1


def _sweep_lines(tmp_path, capsys, options):
    """The dry-run command line of each method's run of a one-solver, one-seed sweep."""
    sweep(benchmark="multidigits", solvers=["ls"], methods=["plain", "sam", "sage"], seeds=[0],
          output_dir=str(tmp_path), dry_run=True, train_options=options)  # fmt: skip
    return {m: line for line in capsys.readouterr().out.splitlines() for m in ("plain", "sam", "sage")
            if f"/{m}/" in line}  # fmt: skip


def test_sweep_passes_rho_and_gamma_only_to_the_methods_that_take_them(tmp_path, capsys):
    lines = _sweep_lines(tmp_path, capsys, ["--rho", "0.1", "--gamma", "0.2"])
    assert "--rho" not in lines["plain"] and "--gamma" not in lines["plain"]
    assert "--rho 0.1" in lines["sam"] and "--gamma" not in lines["sam"]
    assert "--rho 0.1 --gamma 0.2" in lines["sage"]


def test_sweep_passes_the_sage_settings_to_sage_runs_only(tmp_path, capsys):
    lines = _sweep_lines(tmp_path, capsys, ["--preset", "authors", "--disagreement-scope", "shared"])
    assert "--preset" not in lines["plain"] and "--preset" not in lines["sam"]
    assert "--preset authors --disagreement-scope shared" in lines["sage"]
    code = main(["mtl", "sweep", "--benchmark", "multidigits", "--preset", "paper",
                 "--output-dir", str(tmp_path / "s"), "--dry-run"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "unknown preset 'paper'" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--benchmark", "mnist", "--solver", "ls"], "unknown benchmark 'mnist'"),
        (["--benchmark", "multidigits", "--solver", "magic"], "unknown solver 'magic'"),
        (["--benchmark", "nyuv2", "--solver", "ls"], "needs --data-dir"),
        (["--benchmark", "cityscapes", "--solver", "ls", "--data-dir", "/nonexistent/cs"], "/nonexistent/cs"),
        (["--benchmark", "multidigits", "--solver", "ls", "--sage", "--sam"], "exclude each other"),
        (["--benchmark", "multidigits", "--solver", "ls", "--rho", "0.1"], "--rho is the ascent radius"),
        (["--benchmark", "multidigits", "--solver", "ls", "--sam", "--gamma", "0.1"], "--gamma is SAGE's"),
        (["--benchmark", "multidigits", "--solver", "ls", "--epochs", "0"], "--epochs"),
        (["--benchmark", "multidigits", "--solver", "ls", "--device", "warp9"], "device 'warp9'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    code = main(["mtl", "train", *argv, "--output-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_missing_data_files_exit_2_naming_the_path(tmp_path, capsys):
    root = write_fake_nyuv2(tmp_path / "data", n=1, size=(32, 48))
    (root / "train" / "depth" / "0.npy").unlink()
    code = main(["mtl", "train", "--benchmark", "nyuv2", "--solver", "ls", "--data-dir", str(root),
                 "--width", "4", "--output-dir", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "depth" in err and err.count("\n") == 1


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "done").write_text("done\n")
    code = main(["mtl", "train", "--benchmark", "multidigits", "--solver", "ls", "--output-dir",
                 str(tmp_path / "run"), *TINY])  # fmt: skip
    assert code == 2 and "already holds a finished run" in capsys.readouterr().err


def test_cli_toy_writes_the_figure_and_rejects_unknown_solvers(tmp_path, capsys):
    code = main(
        ["mtl", "toy", "--output", str(tmp_path), "--solvers", "ls", "mgda", "--steps", "3", "--no-progress"]
    )
    assert code == 0 and (tmp_path / "mtl_toy.png").stat().st_size > 1000
    assert main(["mtl", "toy", "--output", str(tmp_path / "x"), "--solvers", "magic"]) == 2
    err = capsys.readouterr().err
    assert "unknown solver 'magic'" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
