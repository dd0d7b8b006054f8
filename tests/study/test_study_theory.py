"""The theory test on the last layer (``measure_run(layer="classifier")``) against a brute-force
reference on a real tiny Lite run with a cached trunk, the pretrained regime's sample and its
command."""

import json

import pytest
import torch

from torchsage.harness.records import append_json_line, mark_done
from torchsage.study import theory
from torchsage.study.__main__ import main
from torchsage.study.pretrained import PT_CELLS, pt_jobs

DAMPING = 0.1


def _tiny_lite_run(out, data_dir):
    """5 steps of ERM on the tiny EmojiStylesPip (tests/tiny_emoji.py), the top two blocks of a
    randomly initialised Lite0 trained on the cached trunk. The initial weights come from a file,
    as the packaged ImageNet weights do in the study. Dropout on the features and
    BatchNorm on batch statistics make the featurizer's training mode differ from its evaluation
    mode."""
    from torchsage.dg.efficientnet import EfficientNetLite0
    from torchsage.dg.train import TrainArgs, train

    torch.save(EfficientNetLite0(num_classes=None).state_dict(), out.parent / "lite0.pt")
    hparams = {"pretrained": None, "pretrained_path": str(out.parent / "lite0.pt"), "image_size": 32}
    hparams.update(train_from_block=14, cache_trunk=True)
    hparams.update(batch_size=4, lr=1e-3, dropout=0.5, freeze_bn=False)
    args = TrainArgs("EmojiStylesPip", "ERM", [2], str(out), data_dir=data_dir, steps=5, seed=0)
    args.hparams, args.save_model, args.progress, args.num_workers = json.dumps(hparams), True, False, 0
    args.device = "cpu"
    return train(args)


def _reference(network, batches, train_mode=False):
    """The terms of the classifier's loss, brute force in float64: the exact mean Hessian of the
    per-distribution cross-entropies (torch.autograd.functional.hessian over the flat (weight,
    bias) vector) on the penultimate features, the alignment term by a dense solve."""
    featurizer, head = network[0], network[1]
    featurizer.train(train_mode)
    with torch.no_grad():
        data = [(featurizer(x).double(), y) for x, y in batches]
    C, F = head.weight.shape
    theta = torch.cat([head.weight.detach().flatten(), head.bias.detach()]).double()

    def loss(k):
        x, y = data[k]
        return lambda t: torch.nn.functional.cross_entropy(x @ t[: C * F].view(C, F).T + t[C * F :], y)

    K = len(data)
    grads = [torch.autograd.functional.jacobian(loss(k), theta) for k in range(K)]
    H = sum(torch.autograd.functional.hessian(loss(k), theta, vectorize=True) for k in range(K)) / K
    g_bar = sum(grads) / K
    d = [g - g_bar for g in grads]
    damped = H + DAMPING * torch.eye(len(theta), dtype=torch.float64)
    per = [float(dk @ torch.linalg.solve(damped, dk)) for dk in d]
    evals = torch.linalg.eigvalsh(H)
    return {
        "num_params": len(theta),
        "alignment": sum(per) / K,
        "per": per,
        "d_sq": [float(dk @ dk) for dk in d],
        "trace": float(H.trace()),
        "top": float(evals[-1]),
        "min": float(evals[0]),
        "grad_norms": [float(g.norm()) for g in grads],
    }


def test_the_classifier_layer_is_the_brute_force_terms_of_the_last_layer(tiny_emoji, tmp_path):
    from torchsage.dg.checkpoint import load_dg_model
    from torchsage.files import safe_torch_load

    out = _tiny_lite_run(tmp_path / "run", tiny_emoji)
    # decompose's exact Hessian: the trace and the eigenvalues are exact up to float32 rounding,
    # the alignment up to the conjugate-gradient residual it reports
    settings = {"batch_size": 8, "damping": DAMPING, "exact": True, "cg_tol": 1e-6, "cg_max_iter": 400}
    payload = theory.measure_run(out, settings, layer="classifier")
    assert json.loads((out / "theory.json").read_text()) == payload
    assert payload["settings"] == {**theory.THEORY_SETTINGS, **settings, "layer": "classifier"}
    assert theory.payload_layer(payload) == "classifier" and theory.payload_layer({"settings": {}}) == "all"
    last = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert payload["gap"] == theory.gap(last)

    network, batches, names = load_dg_model(safe_torch_load(out / "model.pt"), 8)
    assert payload["distributions"] == names and len(names) == 2
    ref = _reference(network, batches)
    r = payload["report"]
    # the classifier alone (Linear 1280 -> 2), not the trained top blocks
    assert r["num_params"] == ref["num_params"] == 1280 * 2 + 2 and r["exact"] and r["K"] == 2
    assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    assert r["curvature_trace"] == pytest.approx(ref["trace"], rel=1e-4)
    assert r["curvature_top"][0] == pytest.approx(ref["top"], rel=1e-4)
    # |d^T x - d^T x*| = |d^T (H + λI)^-1 r| <= |d| |r| / λ_min(H + λI), |r| <= residual |d|;
    # plus float32 rounding of the Hessian (1e-4 of the term)
    for got, want, d_sq in zip(r["alignment_per_distribution"], ref["per"], ref["d_sq"]):
        bound = r["alignment_residuals"] * d_sq / (ref["min"] + DAMPING) + 1e-4 * want
        assert abs(got - want) <= bound
    assert r["alignment"] == pytest.approx(ref["alignment"], rel=1e-3)
    assert ref["alignment"] > 0 and ref["min"] > -1e-8  # convex in the last layer
    # the comparison can tell the featurizer's modes apart: in training mode (dropout, batch
    # statistics) the features, so the terms, are others
    train_ref = _reference(network, batches, train_mode=True)
    assert abs(train_ref["trace"] - ref["trace"]) > 1e-2 * ref["trace"]
    assert abs(train_ref["alignment"] - ref["alignment"]) > 1e-2 * ref["alignment"]


def test_the_classifier_view_runs_the_featurizer_in_evaluation_mode_and_restores_it():
    featurizer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    network = torch.nn.Sequential(featurizer, torch.nn.Linear(4, 2)).train()
    featurizer[1].eval()  # a frozen BatchNorm stays frozen
    batches = [(torch.randn(6, 3), torch.tensor([0, 1] * 3)) for _ in range(2)]
    with torch.no_grad():
        featurizer[1].running_mean.add_(1.0)
    head, features = theory.classifier_view(network, batches)
    assert head is network[1]
    assert [m.training for m in network.modules()] == [True, True, True, False, True, True]
    featurizer.eval()
    for (f, y), (x, y0) in zip(features, batches):
        assert torch.equal(f, featurizer(x)) and torch.equal(y, y0) and not f.requires_grad


def test_measure_run_refuses_an_unknown_layer_or_setting(tmp_path):
    with pytest.raises(ValueError, match="layer must be one of all, classifier"):
        theory.measure_run(tmp_path, layer="head")
    with pytest.raises(ValueError, match="unknown theory settings layer"):
        theory.measure_run(tmp_path, {"layer": "classifier"})


def _finish(job, model=True):
    env = job.settings["test_env"]
    record = {"step": 400, "args": {"test_envs": [env], "dataset": "EmojiStyles", "algorithm": "ERM"}}
    for i in range(6):
        record[f"env{i}_in_acc"], record[f"env{i}_out_acc"] = 0.7, 0.8
    job.output_dir.mkdir(parents=True)
    append_json_line(job.output_dir / "results.jsonl", record)
    if model:
        (job.output_dir / "model.pt").write_bytes(b"")
    mark_done(job.output_dir)


def test_the_pretrained_sample_is_finished_core_runs_only(tmp_path):
    core = pt_jobs(str(tmp_path), cells=PT_CELLS[:1], core=True)
    assert len(core) == 40
    for job in core[:10]:
        _finish(job)
    _finish(core[10], model=False)  # finished without a model: not measurable
    core[11].output_dir.mkdir(parents=True)  # started, not finished
    others = pt_jobs(str(tmp_path), cells=PT_CELLS[:1], ablations=True)[:3]
    others += pt_jobs(str(tmp_path), cells=PT_CELLS[1:], core=True)[:3]
    for job in others:  # finished runs of other parts: never sampled
        _finish(job)
    sample, left = theory.sample_pretrained(tmp_path)
    assert sorted(sample) == sorted(job.output_dir for job in core[:10]) and left == 40 - 11
    few, _ = theory.sample_pretrained(tmp_path, max_runs=4)
    assert few == sample[:4] and theory.sample_pretrained(tmp_path, max_runs=4)[0] == few


def test_the_pretrained_theory_command_measures_the_classifier_and_resumes(tmp_path, monkeypatch, capsys):
    core = pt_jobs(str(tmp_path), cells=PT_CELLS[:1], core=True)
    for job in core[:5]:
        _finish(job)
    calls = []

    def fake(run_dir, settings=None, layer="all"):
        calls.append((run_dir, layer))
        (run_dir / theory.THEORY_FILE).write_text("{}")

    monkeypatch.setattr(theory, "measure_run", fake)
    argv = ["theory", "--pretrained", "--root", str(tmp_path), "--no-progress"]
    assert main([*argv, "--max-runs", "3"]) == 0
    assert {layer for _, layer in calls} == {"classifier"} and len(calls) == 3
    assert "35 run(s) of pt-symbola-core not finished" in capsys.readouterr().out
    assert main(argv) == 0  # the default: every finished core run; the 3 measured are skipped
    assert len(calls) == 5 and len({d for d, _ in calls}) == 5
    assert "measured 2 run(s) now; 5 in the sample" in capsys.readouterr().out


def test_a_randomly_initialised_cached_trunk_is_read_back_from_the_checkpoint(tiny_emoji, tmp_path):
    """A run whose frozen trunk was drawn at random (no weights file) saves that trunk in its
    network; the cached inputs load_dg_model returns are that trunk's outputs, not a new draw's."""
    from torchsage.dg.checkpoint import load_dg_model
    from torchsage.dg.train import TrainArgs, train

    hparams = {"pretrained": None, "image_size": 32, "train_from_block": 14, "cache_trunk": True}
    hparams.update(batch_size=4, lr=1e-3)
    run = str(tmp_path / "run")
    args = TrainArgs("EmojiStylesPip", "ERM", [2], run, data_dir=tiny_emoji, steps=2, seed=0)
    args.hparams, args.save_model, args.progress, args.num_workers = json.dumps(hparams), True, False, 0
    args.device = "cpu"
    train(args)
    checkpoint = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    torch.manual_seed(1234)  # another generator state than the run's
    network, batches, _ = load_dg_model(checkpoint, 6)
    raw = {**checkpoint, "hparams": {**checkpoint["hparams"], "cache_trunk": False}}
    _, images, _ = load_dg_model(raw, 6)
    with torch.no_grad():
        for (cached, y), (x, y_raw) in zip(batches, images, strict=True):
            assert torch.equal(y, y_raw)
            expected = network[0].trunk(x)
            # the same weights on the same images, batched differently: float32 rounding apart
            torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-5)
