"""``torchsage diagnose`` on a tiny saved DG model, the sandbox, and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from torchsage.cli import main
from torchsage.dg.datasets import get_dataset, seed_hash, split_environment
from torchsage.dg.train import TrainArgs, train

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--hutchinson-samples", "2", "--lanczos-steps", "3", "--cg-max-iter", "3", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dg") / "run"
    train(
        TrainArgs(
            dataset="RotatedDigits",
            algorithm="ERM",
            test_envs=[0],
            output_dir=str(out),
            steps=2,
            hparams='{"cnn_width": 8}',
            save_model=True,
            progress=False,
        )
    )
    return out


def _reference_grad_norms(run_dir, envs, n):
    """Per-environment gradient norms computed here from the first n samples of each in split."""
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    from torchsage.dg.networks import classifier, featurizer

    feat = featurizer(ckpt["input_shape"], ckpt["hparams"])
    net = torch.nn.Sequential(feat, classifier(feat.n_outputs, ckpt["num_classes"], False))
    net.load_state_dict(ckpt["model"])
    net.eval()
    data = get_dataset("RotatedDigits")
    norms = []
    for i in envs:
        part, _ = split_environment(data.environments[i], 0.2, seed_hash(0, i))
        idx = torch.as_tensor(part.indices[:n])
        x, y = data.environments[i].tensors[0][idx], data.environments[i].tensors[1][idx]
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
        norms.append(float(torch.cat([g.reshape(-1) for g in grads]).norm()))
    return norms, sum(p.numel() for p in net.parameters())


def test_diagnose_writes_json_and_png_with_the_measured_terms(run_dir, tmp_path, capsys):
    out = tmp_path / "diag"
    code = main(
        ["diagnose", str(run_dir), "--output", str(out), "--batch-size", "8", "--damping", "10", *FAST]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "alignment term" in printed and "curvature term" in printed
    payload = json.loads((out / "diagnose.json").read_text())
    assert (out / "diagnose.png").read_bytes()[:8] == PNG
    assert not list(out.glob("*.tmp"))
    assert payload["kind"] == "dg" and payload["algorithm"] == "ERM"
    assert payload["distributions"] == ["15deg", "30deg", "45deg", "60deg", "75deg"]  # training envs
    report = payload["report"]
    norms, n_params = _reference_grad_norms(run_dir, [1, 2, 3, 4, 5], 8)
    assert report["K"] == 5 and report["num_params"] == n_params
    # the command's gradients against this float32 recomputation, batched otherwise: float32 sums
    # of ~8 * 28 * 28 terms round by ~sqrt(6e3) * 2**-24 = 5e-6 relative: 1e-4
    assert report["grad_norms"] == pytest.approx(norms, rel=1e-4)
    assert report["damping"] == 10.0
    assert report["alignment"] is None or report["alignment"] > 0


def test_diagnose_on_model_file_with_chosen_envs_defaults_to_its_folder(run_dir, tmp_path):
    import shutil

    target = tmp_path / "copy"
    target.mkdir()
    shutil.copy(run_dir / "model.pt", target / "model.pt")
    code = main(["diagnose", str(target / "model.pt"), "--envs", "0", "3", "--batch-size", "4", *FAST])
    assert code == 0
    payload = json.loads((target / "diagnose.json").read_text())
    assert payload["distributions"] == ["0deg", "45deg"]
    norms, _ = _reference_grad_norms(run_dir, [0, 3], 4)
    assert payload["report"]["grad_norms"] == pytest.approx(norms, rel=1e-4)


def test_diagnose_sandbox_writes_tables_and_figures(tmp_path, capsys):
    code = main(
        [
            "diagnose",
            "sandbox",
            "--output",
            str(tmp_path),
            "--repeats",
            "20",
            "--steps",
            "4",
            "--dim",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    for name in ("theory_sandbox.png", "theory_counterexample.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    data = json.loads((tmp_path / "sandbox.json").read_text())
    assert set(data) == {"prediction", "counterexample", "methods"}
    assert "## Counterexample" in (tmp_path / "sandbox.md").read_text()
    assert "Counterexample" in capsys.readouterr().out


def _bad(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_input_is_one_line_and_exit_code_2(run_dir, tmp_path, capsys):
    cases = []
    cases.append((["diagnose", str(tmp_path / "missing")], "no such file or directory"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["diagnose", str(empty)], "holds no model.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    cases.append((["diagnose", str(junk)], "not a readable torch file"))
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}}, partial)
    cases.append((["diagnose", str(partial)], "lacks args, hparams"))
    cases.append((["diagnose", str(run_dir), "--envs", "9", "1", *FAST], "environment 9 out of range"))
    cases.append((["diagnose", str(run_dir), "--envs", "2", *FAST], "at least 2 distinct environments"))
    mtl = tmp_path / "mtl.pt"
    torch.save({"benchmark": "NoSuchBenchmark", "args": {}}, mtl)
    cases.append((["diagnose", str(mtl)], "torchsage: error:"))
    for argv, message in cases:
        code, err = _bad(argv, capsys)
        assert code == 2, argv
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
        assert "Traceback" not in err
    for argv in (
        ["diagnose", str(run_dir), "--damping", "-1"],
        ["diagnose", str(run_dir), "--batch-size", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_diagnose_multi_task_checkpoint_uses_one_loss_per_task(tmp_path, capsys):
    from torchsage.mtl.checkpoint import load_for_diagnostics

    run = tmp_path / "mtl"
    argv = ["mtl", "train", "--benchmark", "multidigits", "--solver", "ls", "--output-dir", str(run)]
    argv += ["--save-model", "--epochs", "1", "--n-train", "32", "--n-test", "16", "--width", "4"]
    assert main([*argv, "--batch-size", "8", "--device", "cpu", "--no-progress"]) == 0
    code = main(["diagnose", str(run), "--batch-size", "8", "--damping", "5", *FAST])
    assert code == 0, capsys.readouterr().err
    payload = json.loads((run / "diagnose.json").read_text())
    assert payload["kind"] == "mtl" and payload["distributions"] == ["left", "right"]
    # reference: each task's gradient by plain autograd on the same batches
    model, batches, loss_fns = load_for_diagnostics(run, n_batches=1, batch_size=8, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for (x, y), fn in zip(batches, loss_fns):
        grads = torch.autograd.grad(fn(model(x), y), params, allow_unused=True)
        norms.append(float(torch.cat([g.reshape(-1) for g in grads if g is not None]).norm()))
    assert payload["report"]["grad_norms"] == pytest.approx(norms, rel=1e-4)
    assert payload["report"]["K"] == 2
