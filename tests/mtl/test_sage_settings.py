"""``mtl train/sweep --preset authors`` and the SAGE flags: what reaches the optimizer and the
solver, what is recorded, and one clear error for each misuse."""

import json

import pytest
import torch

from torchsage.cli import main
from torchsage.mtl.train import MTLArgs, make_optimizer, resolve
from torchsage.optim import SAGE

torchjd = pytest.importorskip("torchjd")
from torchjd.scalarization import FAMO, Sum  # noqa: E402

from torchsage.mtl.sage_settings import solver_options  # noqa: E402
from torchsage.mtl.solvers import solver_spec  # noqa: E402

TINY = ["--n-train", "32", "--n-test", "20", "--batch-size", "16", "--epochs", "1", "--no-progress"]


def _args(**kw):
    base = dict(benchmark="multidigits", solver="ls", output_dir="unused", progress=False)
    base.update(kw)
    return MTLArgs(**base)


def _optimizer(args):
    _, cfg = resolve(args)
    solver = solver_spec(cfg["solver"])(2, **solver_options(args, cfg["solver"]))
    model = torch.nn.Linear(3, 2)
    return make_optimizer(model.parameters(), solver, args.method, cfg, 0, model), solver, cfg


@pytest.mark.parametrize(("benchmark", "rho"), [("multidigits", 5e-4), ("nyuv2", 5e-4), ("cityscapes", 3e-3)])
def test_preset_authors_builds_the_authors_optimizer(benchmark, rho):
    opt, solver, cfg = _optimizer(_args(benchmark=benchmark, preset="authors", data_dir="unused"))
    assert isinstance(opt, SAGE)
    group = opt.param_groups[0]
    assert (group["lr"], group["rho"], group["gamma"]) == (1e-4, rho, 1e-4)
    assert opt.ascent.scaling == "weight" and opt.measure == "normalized_std"
    assert opt.disagreement_scope == "all" and opt.ascent.polar_kwargs["dtype"] == torch.bfloat16
    assert type(solver) is Sum  # the authors' LS is the sum of the task losses
    assert cfg["preset"] == "authors" and cfg["ns_dtype"] == "bfloat16"


def test_preset_famo_is_updated_from_the_perturbed_losses_with_their_weight_decay():
    opt, solver, _ = _optimizer(_args(solver="famo", preset="authors"))
    assert opt.solver_update == "perturbed" and isinstance(solver, FAMO) and solver.weight_decay == 0.01
    plain, plain_solver, _ = _optimizer(_args(solver="famo", sage=True))
    assert plain.solver_update == "clean" and plain_solver.weight_decay == 1e-3


def test_flags_override_the_preset_and_default_without_it():
    opt, _, _ = _optimizer(
        _args(preset="authors", rho=1e-3, lr=3e-4, disagreement="cosine", disagreement_scope="shared")
    )
    group = opt.param_groups[0]
    assert (group["lr"], group["rho"]) == (3e-4, 1e-3)
    assert opt.measure == "cosine" and opt.disagreement_scope == "shared" and opt.ascent.scaling == "weight"
    default, _, _ = _optimizer(_args(sage=True))
    assert default.ascent.scaling == "global" and default.measure == "normalized_std"
    assert default.disagreement_scope == "shared" and default.param_groups[0]["rho"] == 0.05
    flags, _, _ = _optimizer(_args(sage=True, rho_scaling="layer", disagreement_scope="all"))
    assert flags.ascent.scaling == "layer" and flags.disagreement_scope == "all"


def test_preset_run_records_its_settings(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["mtl", "train", "--benchmark", "multidigits", "--solver", "ls", "--preset", "authors",
                 "--output-dir", str(out), *TINY])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    args = record["args"]
    assert args["method"] == "sage" and args["preset"] == "authors" and args["rho"] == 5e-4
    assert (args["rho_scaling"], args["disagreement_scope"], args["lr"]) == ("weight", "all", 1e-4)
    assert record["noise_std"] == pytest.approx(1e-4 * record["disagreement"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "paper"], "unknown preset 'paper': use one of authors"),
        (["--preset", "authors", "--sam"], "--preset authors configures SAGE: drop --sam"),
        (["--disagreement-scope", "all"], "--disagreement-scope is a SAGE option"),
        (["--sam", "--rho-scaling", "weight"], "--rho-scaling is a SAGE option"),
        (["--sage", "--disagreement-scope", "heads"], "--disagreement-scope must be one of shared, all"),
        (["--sage", "--disagreement", "spread"], "--disagreement must be one of normalized_std"),
    ],
)
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, argv, message):
    code = main(["mtl", "train", "--benchmark", "multidigits", "--solver", "ls", *argv,
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_scope_and_preset_need_a_solver(tmp_path, capsys):
    for flags in (["--sage", "--disagreement-scope", "all"], ["--preset", "authors"]):
        code = main(["mtl", "train", "--benchmark", "multidigits", "--solver", "stl", *flags,
                     "--output-dir", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "needs a multi-task solver" in err and err.count("\n") == 1


def test_help_lines_show_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["mtl", "sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--preset authors", "(default: global; with --preset authors: weight)",
                   "(default: normalized_std", "(default: shared; with --preset authors: all)"):  # fmt: skip
        assert phrase in text, phrase
