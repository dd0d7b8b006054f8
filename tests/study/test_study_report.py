"""The study's selection, tables and figures on synthetic run directories (values chosen so the
expected selection and differences are known), and the theory wiring on a real 2-step run."""

import json
import math

import pytest

from torchsage.harness.records import append_json_line, mark_done
from torchsage.study import figures, render
from torchsage.study import report as rep
from torchsage.study.spec import dg_arms, dg_jobs, gamma_measure_arms, part_jobs
from torchsage.study.theory import fits, gap, measure_run


def _finish(job, val, test):
    """A fake finished RotatedDigits run: training domains' out accuracy ``val``, test ``test``."""
    env = job.settings["test_env"]
    record = {"step": 999, "args": {"test_envs": [env], "dataset": job.settings["dataset"]}}
    for i in range(6):
        record[f"env{i}_in_acc"] = test if i == env else 0.5
        record[f"env{i}_out_acc"] = 0.5 if i == env else val
    job.output_dir.mkdir(parents=True)
    append_json_line(job.output_dir / "results.jsonl", record)
    mark_done(job.output_dir)


def test_selection_and_paired_table(tmp_path):
    jobs = dg_jobs(tmp_path, cells=[("RotatedDigits", 0)], n_trials=3)
    for job in jobs:
        s, t = job.settings, job.settings["trial"]
        if s["algorithm"] == "SAM":
            # the rho with the best validation accuracy has test accuracy 0.80 + 0.01 t; others 0.10
            best = s["hparams"]["rho"] == 0.05
            _finish(job, 0.95 if best else 0.90, 0.80 + 0.01 * t if best else 0.10)
        elif s["algorithm"] == "ERM":
            _finish(job, 0.9, 0.70 + 0.02 * t)
        else:
            _finish(job, 0.9, 0.75)
    runs, missing = rep.load_dg(tmp_path, cells=[("RotatedDigits", 0)], n_trials=3)
    assert missing == 0
    # SAGE (default) stands for its grid twin and for the follow-up's default run too
    assert len(runs) == 3 * (len(dg_arms()) + 1)
    selected = rep.select(runs)
    sam = selected[("RotatedDigits", 0, "SAM")]
    assert [sam[t].hparams["rho"] for t in range(3)] == [0.05] * 3
    # SAM - ERM per trial: 0.10, 0.09, 0.08 -> mean 0.09; three positive differences: p = 2 / 8
    erm = {t: r.test_acc for t, r in selected[("RotatedDigits", 0, "ERM")].items()}
    p = rep.compare({t: r.test_acc for t, r in sam.items()}, erm)
    assert p.mean == pytest.approx(0.09, abs=1e-12) and p.p == pytest.approx(0.25, rel=1e-12)
    table = rep.dg_table(selected, "RotatedDigits", 0, "0deg")
    assert "| SAM " in table and "+9.0 [" in table
    path = figures.plot_sensitivity(runs, tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_across_cells_repeats_each_cells_comparisons(tmp_path):
    cells = [("RotatedDigits", 0), ("RotatedDigits", 3)]
    jobs = dg_jobs(tmp_path, cells=cells, n_trials=3)
    for job in jobs:
        s, t = job.settings, job.settings["trial"]
        shift = (
            0.0 if s["test_env"] == 0 else -0.2
        )  # SAM 9 points above ERM in one cell, 11 below in the other
        if s["algorithm"] == "SAM":
            best = s["hparams"]["rho"] == 0.05
            _finish(job, 0.95 if best else 0.90, 0.80 + 0.01 * t + shift if best else 0.10)
        elif s["algorithm"] == "ERM":
            _finish(job, 0.9, 0.70 + 0.02 * t)
        else:
            _finish(job, 0.9, 0.75)
    runs, missing = rep.load_dg(tmp_path, cells=cells, n_trials=3)
    assert missing == 0
    selected = rep.select(runs)
    summary = rep.summary_table(selected)
    sam_row = next(line for line in summary.splitlines() if line.startswith("| SAM "))
    assert "+9.0 [" in sam_row and "-11.0 [" in sam_row
    # each entry is the cell table's own "Δ vs ERM", Holm-adjusted within the cell
    for (dataset, env), name in zip(cells, ["0deg", "45deg"]):
        cell_row = next(
            line for line in rep.dg_table(selected, dataset, env, name).splitlines() if "| SAM " in line
        )
        assert cell_row.split("|")[4].strip() in sam_row
    path = figures.plot_differences(selected, tmp_path / "d.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gamma_measure_table_separates_the_two_factors():
    # accuracy = base(trial) + 0.03 [gamma 1e-2] + 0.01 [cosine] + 0.02 [both]: the gamma effect
    # averaged over the measures is 0.03 + 0.02 / 2 = 4 points, the measure's 0.01 + 0.02 / 2 = 2,
    # the interaction (cosine's effect at 1e-2 minus at 1e-3) 0.03 - 0.01 = 2; every trial agrees,
    # so the exact Wilcoxon p is 2 / 2**10 and Holm's over six comparisons is below 0.05
    from pathlib import Path

    runs = []
    for arm in gamma_measure_arms():
        high, cosine = arm.hparams["gamma"] == 1e-2, arm.hparams["disagreement"] == "cosine"
        for t in range(10):
            acc = 0.5 + 0.013 * t + 0.03 * high + 0.01 * cosine + 0.02 * (high and cosine)
            d = (0.7 + 0.2 * t / 9) if cosine else None if high else 1.4  # cosine: mean 0.8 over trials
            runs.append(
                rep.DGRun(
                    "ColoredDigits", 2, t, arm.method, arm.hparams, 0.8, acc, Path(f"{arm.method}{t}"), d
                )
            )
    table = rep.gamma_measure_table(rep.select(runs))
    assert "ColoredDigits, test domain -90%" in table and "RotatedDigits" not in table
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "+4.0 [+4.0, +4.0] p=0.012 *" in lines["gamma 1e-2 vs 1e-3"]
    assert "+2.0 [+2.0, +2.0] p=0.012 *" in lines["cosine vs normalized_std"]
    assert "+2.0 [+2.0, +2.0] p=0.012 *" in lines["interaction"]
    cells = {name: [c.strip() for c in line.split("|")[1:-1]] for name, line in lines.items()}
    assert cells["SAGE g=0.01 cosine"][3:] == ["0.80", "+6.0 [+6.0, +6.0] p=0.012 *"]
    assert cells["SAGE g=0.001 normalized_std"][3:] == ["1.40", "–"]
    assert cells["SAGE g=0.01 normalized_std"][3] == "–"  # D not logged: a dash, not a number
    assert rep.gamma_measure_table(rep.select(runs[:1])) is None


def test_a_cell_with_one_trial_is_named_not_tabulated(tmp_path):
    for job in dg_jobs(tmp_path / "runs", cells=[("RotatedDigits", 0)], n_trials=1):
        _finish(job, 0.9, 0.8)
    text = render.render(tmp_path / "runs", tmp_path / "figures")
    assert "Not shown until two trials of ERM have finished there: RotatedDigits 0deg." in text
    assert "test domain 0deg" not in text and not (tmp_path / "figures" / "study_sensitivity.png").exists()


def test_incomplete_method_is_not_selected(tmp_path):
    jobs = dg_jobs(tmp_path, cells=[("RotatedDigits", 0)], n_trials=1)
    sam = [j for j in jobs if j.settings["algorithm"] == "SAM"]
    _finish(sam[0], 0.9, 0.8)  # one SAM choice of several finished
    runs, _ = rep.load_dg(tmp_path, cells=[("RotatedDigits", 0)], n_trials=1)
    assert ("RotatedDigits", 0, "SAM") not in rep.select(runs)


def test_fits_recover_an_exact_relation():
    payloads = []
    for a, tr in [(1e-3, 5.0), (1e-2, 2.0), (1e-1, 9.0), (1.0, 1.0), (10.0, 3.0), (3.0, 30.0)]:
        g = 0.05 + 0.02 * math.log10(a) - 0.01 * math.log10(tr)
        report = {
            "alignment": a,
            "negative_curvature": False,
            "curvature_trace": tr,
            "curvature_trace_stderr": 0.1,
            "curvature_top": [tr / 2],
            "curvature_top_residuals": [1e-6],
            "alignment_residuals": 1e-5,
            "cg_iterations": [3, 4],
        }
        payloads.append({"gap": g, "dataset": "RotatedDigits", "report": report})
    payloads.append(
        {"gap": 0.3, "dataset": "RotatedDigits", "report": {"alignment": None, "negative_curvature": True}}
    )
    result = fits(payloads, n_resamples=50)
    assert result["dropped"] == 1 and result["n"] == 6
    both = result["fits"]["alignment + trace"]
    assert both.coef == pytest.approx((0.02, -0.01), abs=1e-10) and both.r2 == pytest.approx(1.0, abs=1e-10)
    assert rep.fit_table(result).count("\n|") >= 4
    assert "have no logarithm" not in rep.fit_table(result)
    # a run whose distributions all have one gradient: alignment exactly 0, out of the alignment fits only
    zero = {**payloads[0], "report": {**payloads[0]["report"], "alignment": 0.0}}
    with_zero = fits([*payloads, zero], n_resamples=50)
    assert with_zero["fits"]["alignment"].n == 6 and with_zero["fits"]["trace"].n == 7
    assert "left out of the fits using it (alignment 1)" in rep.fit_table(with_zero)
    assert figures.plot_theory(
        result, __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "t.png"
    ).exists()


def test_fits_within_cells_separate_a_cell_offset_from_a_predictor(tmp_path):
    # two cells whose gaps differ by 40 points; inside each, the gap falls 0.03 per decade of
    # alignment exactly, and the cell with the larger gap has the larger alignment: pooled, the
    # slope has the wrong sign; with one intercept per cell it is exact
    payloads = []
    for cell, offset, shift in [(0, 0.1, 0.0), (3, 0.5, 2.0)]:
        for i, tr in enumerate([1.0, 2.0, 4.0, 8.0, 16.0]):
            a = 10.0 ** (shift + 0.3 * i)
            report = {
                "alignment": a,
                "negative_curvature": False,
                "curvature_trace": tr,
                "curvature_trace_stderr": 0.1,
                "curvature_top": [tr],
                "curvature_top_residuals": [1e-6],
                "alignment_residuals": 1e-5,
                "cg_iterations": [3],
            }
            gap = offset - 0.03 * math.log10(a)
            payloads.append({"gap": gap, "dataset": "RotatedDigits", "test_envs": [cell], "report": report})
    result = fits(payloads, n_resamples=50)
    assert sorted(result["cells"]) == ["RotatedDigits 0deg", "RotatedDigits 45deg"]
    assert result["fits"]["alignment"].coef[0] > 0  # pooled: confounded by the cells
    within = result["within"]["alignment"]
    assert within.coef[0] == pytest.approx(-0.03, abs=1e-12) and within.r2 == pytest.approx(1.0, abs=1e-12)
    for cell_fits in result["cells"].values():
        assert cell_fits["alignment"].coef[0] == pytest.approx(-0.03, abs=1e-12)
    table = rep.fit_table(result)
    assert "all runs, within cells" in table and "RotatedDigits 45deg" in table
    assert figures.plot_theory(result, tmp_path / "t.png").exists()


def test_measurement_precision_states_the_worst_and_the_median():
    rows = [
        {"trace": 10.0, "trace_stderr": 1.0, "cg_residual": 1e-5, "cg_iterations": 7, "lambda_max": 4.0,
         "lambda_residual": 0.02},
        {"trace": 100.0, "trace_stderr": 2.0, "cg_residual": 3e-5, "cg_iterations": 12, "lambda_max": 50.0,
         "lambda_residual": 0.05},
        {"trace": 4.0, "trace_stderr": 2.0, "cg_residual": 2e-5, "cg_iterations": 9, "lambda_max": 2.0,
         "lambda_residual": 0.001},
    ]  # fmt: skip
    # relative standard errors 10%, 2%, 50%: median 10%, largest 50%; Lanczos 0.5%, 0.1%, 0.05%
    assert rep.measurement_precision(rows) == (
        "Measurement precision over the 3 fitted runs: Hutchinson standard error of tr H̄ median 10.0%, "
        "largest 50.0% of the trace; CG relative residual at most 3e-05 (12 iterations at most); "
        "Lanczos residual of λ_max at most 0.5% of it."
    )


def test_trained_payloads_drop_runs_at_chance():
    import inspect
    from pathlib import Path

    from torchsage.dg.datasets import get_dataset
    from torchsage.dg.emoji import build_emoji_styles

    for name, n in rep.N_CLASSES.items():
        if name == "EmojiStyles":  # built from installed emoji designs: its class count is the builder's
            assert inspect.signature(build_emoji_styles).parameters["num_classes"].default == n
        else:
            assert get_dataset(name).num_classes == n

    def run(name, dataset, val):
        return rep.DGRun(dataset, 0, 0, "SAGE", {}, val, 0.1, Path(name))

    runs = [run("a", "RotatedDigits", 0.19), run("b", "RotatedDigits", 0.21), run("c", "ColoredDigits", 0.55)]
    runs.append(run("d", "ColoredDigits", 0.65))
    payloads = [{"run": name} for name in "abcde"]  # "e" has no run: kept
    assert [p["run"] for p in rep.trained_payloads(runs, payloads)] == ["b", "d", "e"]


def test_measure_run_on_a_saved_model(tmp_path):
    from torchsage.dg.train import TrainArgs, train

    hp = json.dumps({"cnn_width": 8, "batch_size": 8})
    args = TrainArgs("ColoredDigits", "ERM", [2], str(tmp_path / "run"), steps=2, seed=1, hparams=hp)
    args.save_model, args.progress = True, False
    out = train(args)
    settings = {
        "batch_size": 16,
        "cg_max_iter": 20,
        "hutchinson_samples": 4,
        "lanczos_steps": 5,
        "damping": 1.0,
    }
    payload = measure_run(out, settings)
    saved = json.loads((out / "theory.json").read_text())
    assert saved["gap"] == payload["gap"]
    last = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert payload["gap"] == pytest.approx(gap(last), abs=0)
    assert payload["report"]["K"] == 2 and payload["settings"]["damping"] == 1.0
    assert payload["report"]["curvature_trace"] is not None


def test_records_file_renders_what_the_run_directories_render(tmp_path):
    """A fresh clone has only the exported records: the report from them must be the same text."""
    from torchsage.study.records import export, load

    root = tmp_path / "runs"
    main = dg_jobs(root, n_trials=2)
    followup = [j for j in part_jobs(root, "dg-gamma-measure") if j.settings["trial"] < 2]
    finished = {}
    for job in main + followup:
        s, t = job.settings, job.settings["trial"]
        if s["dataset"] == "RotatedDigits" and s["test_env"] == 0 and job.output_dir not in finished:
            finished[job.output_dir] = job
            _finish(
                job,
                0.9 + 0.001 * len(json.dumps(s["hparams"])),
                0.6 + 0.05 * t + 0.01 * s["hparams"].get("gamma", 0),
            )
    theory = {"run": "x", "dataset": "RotatedDigits", "gap": 0.1, "report": {"alignment": None}}
    (root / "dg" / "x").mkdir(parents=True)
    (root / "dg" / "x" / "theory.json").write_text(json.dumps(theory))
    from_dirs = render.render(root, tmp_path / "fig1")
    path = export(root, tmp_path / "records.jsonl")
    runs, missing, mtl, payloads = load(path)
    assert payloads == [theory] and mtl == []
    every_job = {j.output_dir for j in dg_jobs(root) + part_jobs(root, "dg-gamma-measure")}
    assert missing == len(every_job) - len(finished)
    assert len(runs) == 2 * (len(dg_arms()) + len(gamma_measure_arms()))
    assert render.render_results(runs, missing, mtl, payloads, tmp_path / "fig2") == from_dirs
    assert "trials" in from_dirs and "| SAGE " in from_dirs
    assert "Follow-up: gamma x disagreement measure, RotatedDigits, test domain 0deg" in from_dirs


def test_records_file_refuses_what_it_cannot_read(tmp_path):
    from torchsage.study.records import load

    with pytest.raises(FileNotFoundError, match=r"torchsage\.study export"):
        load(tmp_path / "none.jsonl")
    (tmp_path / "r.jsonl").write_text('{"kind": "dg"\n')
    with pytest.raises(ValueError, match="export it again"):
        load(tmp_path / "r.jsonl")
    (tmp_path / "r.jsonl").write_text('{"kind": "other"}\n')
    with pytest.raises(ValueError, match="unknown record kind"):
        load(tmp_path / "r.jsonl")


def test_theory_sample_takes_finished_cells_only_and_does_not_move(tmp_path):
    from torchsage.study.spec import DG_CELLS
    from torchsage.study.theory import sample_cells

    def finish_with_model(job):
        _finish(job, 0.9, 0.5)
        (job.output_dir / "model.pt").write_bytes(b"")

    first, second = DG_CELLS[0], DG_CELLS[1]
    for job in dg_jobs(tmp_path, cells=[first]):
        finish_with_model(job)
    sample, waiting = sample_cells(tmp_path, max_runs=8)
    assert len(sample) == 8 // len(DG_CELLS) and len(set(sample)) == len(sample)
    cell_dirs = {job.output_dir for job in dg_jobs(tmp_path, cells=[first])}
    assert set(sample) <= cell_dirs
    assert waiting == [f"{d} env {e}" for d, e in DG_CELLS[1:]]
    # half of another cell finished: the first cell's sample stays, the other is not drawn yet
    half = dg_jobs(tmp_path, cells=[second])
    for job in half[: len(half) // 2]:
        finish_with_model(job)
    assert sample_cells(tmp_path, max_runs=8)[0] == sample
    for job in half[len(half) // 2 :]:
        finish_with_model(job)
    again, waiting = sample_cells(tmp_path, max_runs=8)
    assert again[: len(sample)] == sample and len(again) == 2 * len(sample)
    assert set(again[len(sample) :]) <= {job.output_dir for job in half}
