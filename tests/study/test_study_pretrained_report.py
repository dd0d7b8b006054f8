"""The pretrained regime's report on synthetic run directories: accuracies chosen so that the
selections (training-domain validation and oracle), the differences and the Holm family are known
by hand; a half-finished trial left out; the figures written; the records file round trip."""

import json
from pathlib import Path

import pytest

from torchsage.harness.records import append_json_line, mark_done
from torchsage.study import pretrained_report as ptr
from torchsage.study import report as rep
from torchsage.study.pretrained import PT_CELLS, pt_arms, pt_jobs

SYMBOLA, NOTOCOLOR = PT_CELLS  # (EmojiStyles, 5), (EmojiStyles, 2)
DEFAULT = {"rho_scaling": "global", "rho": 0.05, "gamma": 1e-3, "disagreement": "normalized_std"}


def _finish(job, val, test, oracle, step_time=None):
    """A fake finished EmojiStyles run: training designs' out accuracy ``val``, the held-out design's
    in accuracy ``test`` and out accuracy ``oracle`` (and the harness's ``step_time``, if given)."""
    env = job.settings["test_env"]
    record = {"step": 300, "args": {"test_envs": [env], "dataset": "EmojiStyles"}}
    if step_time is not None:
        record["step_time"] = step_time
    for i in range(6):
        record[f"env{i}_in_acc"] = test if i == env else 0.5
        record[f"env{i}_out_acc"] = oracle if i == env else val
    job.output_dir.mkdir(parents=True)
    append_json_line(job.output_dir / "results.jsonl", record)
    mark_done(job.output_dir)


def _accuracies(job):
    """(val, test, oracle) of every run of the fake study, trial ``t``:

    * ERM: test 0.60 + 0.01 t;
    * SAM: rho 0.05 has the best training-domain validation and test 0.70 + 0.011 t (10 points and
      0.1 t above ERM); rho 0.1 has the best test-domain out accuracy and test 0.50 + 0.02 t;
    * SAGE's grid: (weight, 0.01) the best validation, test 0.65 + 0.01 t (ERM + 5); the default
      (global, 0.05) the best oracle, test 0.75 + 0.01 t (ERM + 15); the rest test 0.55;
    * every other arm: test 0.62 + 0.01 t (ERM + 2).
    """
    s, t = job.settings, job.settings["trial"]
    hp, algorithm = s["hparams"], s["algorithm"]
    if algorithm == "ERM":
        return 0.9, 0.60 + 0.01 * t, 0.5
    if algorithm == "SAM":
        if hp["rho"] == 0.05:
            return 0.95, 0.70 + 0.011 * t, 0.5
        if hp["rho"] == 0.1:
            return 0.90, 0.50 + 0.02 * t, 0.99
        return 0.90, 0.55, 0.5
    if "classifier_ascent" in hp:  # the follow-up: 5 points below SAGE's default, or 3 above
        return 0.9, (0.70 if hp["classifier_ascent"] == "gradient" else 0.78) + 0.01 * t, 0.5
    grid = {k: hp.get(k) for k in DEFAULT}
    if algorithm == "SAGE" and grid == {**DEFAULT, "rho_scaling": "weight", "rho": 0.01}:
        return 0.95, 0.65 + 0.01 * t, 0.5
    if algorithm == "SAGE" and grid == DEFAULT and "optimizer" not in hp:
        return 0.90, 0.75 + 0.01 * t, 0.99
    if algorithm == "SAGE" and "optimizer" not in hp:
        return 0.90, 0.55, 0.5
    return 0.9, 0.62 + 0.01 * t, 0.5


def _fake_study(root):
    """Symbola: 10 trials, trial 9 half-finished for SAM (rho 0.01 and 0.1 only, the latter the
    oracle's choice); Noto Color: trial 0 only. Returns the number of finished run directories."""
    finished = 0
    for job in pt_jobs(str(root), cells=(SYMBOLA,)) + pt_jobs(str(root), cells=(NOTOCOLOR,), n_trials=1):
        s = job.settings
        if s["trial"] == 9 and s["algorithm"] == "SAM" and s["hparams"]["rho"] in (0.02, 0.05):
            continue
        _finish(job, *_accuracies(job))
        finished += 1
    return finished


def _holm(p):
    """Holm's step-down adjustment, written out: the i-th smallest times (m - i), running maximum."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def _rows(table):
    """``{method: [cells]}`` of a rendered markdown table."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| Method") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("pt") / "runs"
    finished = _fake_study(root)
    runs, missing = ptr.load_pt(root)
    return root, finished, runs, missing


def test_loading_counts_runs_and_reads_the_oracle_accuracy(study):
    root, finished, runs, missing = study
    assert finished == 10 * 13 - 2 + 13
    every = {j.output_dir for j in pt_jobs(str(root))}
    assert missing == len(every) - finished == 2 * 130 - finished
    # the default SAGE run stands for "SAGE" (its grid twin) and "SAGE (default)"
    assert len(runs) == finished + 10 + 1
    erm = next(r for r in runs if r.method == "ERM" and r.trial == 3 and r.test_env == 5)
    assert (erm.val_acc, erm.test_acc, erm.oracle_acc) == (0.9, pytest.approx(0.63), 0.5)


def test_selections_and_the_half_finished_trial(study):
    _, _, runs, _ = study
    arms = pt_arms()
    selected, oracle = rep.select(runs, arms), rep.select(runs, arms, by="oracle_acc")
    sam, sam_oracle = selected[(*SYMBOLA, "SAM")], oracle[(*SYMBOLA, "SAM")]
    # trial 9 has two of SAM's four choices: SAM counts in trials 0-8 only, in both selections
    assert sorted(sam) == sorted(sam_oracle) == list(range(9))
    assert sorted(selected[(*SYMBOLA, "ERM")]) == list(range(10))
    assert {r.hparams["rho"] for r in sam.values()} == {0.05}
    assert {r.hparams["rho"] for r in sam_oracle.values()} == {0.1}
    sage, sage_oracle = selected[(*SYMBOLA, "SAGE")], oracle[(*SYMBOLA, "SAGE")]
    assert {(r.hparams["rho_scaling"], r.hparams["rho"]) for r in sage.values()} == {("weight", 0.01)}
    assert {(r.hparams["rho_scaling"], r.hparams["rho"]) for r in sage_oracle.values()} == {("global", 0.05)}
    assert sorted(selected[(*SYMBOLA, "SAGM")]) == list(range(10))
    assert sorted(selected[(*NOTOCOLOR, "ERM")]) == [0]


def test_tables_and_the_holm_family(study):
    _, _, runs, _ = study
    arms = pt_arms()
    selected, oracle = rep.select(runs, arms), rep.select(runs, arms, by="oracle_acc")
    _, comparisons = rep.cell_comparisons(selected, *SYMBOLA, arms)
    # every method but ERM against ERM, every method but SAM against SAM: one family of 14
    others = [
        "SAGE",
        "SAGE (default)",
        "SAGE (authors-dg)",
        "SAGE_CurvatureOnly",
        "SAGE_AlignmentOnly",
        "SAGM",
    ]
    expected = {(m, "ERM") for m in ["SAM", *others]} | {(m, "SAM") for m in ["ERM", *others]}
    assert set(comparisons) == expected and len(expected) == 14
    keys = sorted(comparisons)
    adjusted = _holm([comparisons[k].p for k in keys])
    assert [comparisons[k].p_adjusted for k in keys] == pytest.approx(adjusted, rel=1e-12)
    # SAM - ERM = 0.10 + 0.001 t over trials 0-8: mean 10.4 points, nine distinct positive
    # differences, exact Wilcoxon p = 2 / 2**9
    # by hand: six comparisons over 10 trials of one sign (p = 2 / 2**10) and eight over 9 (p = 2 / 2**9);
    # Holm over 14: the smallest six become 14 x 2 / 2**10, the rest 8 x 2 / 2**9 (the running maximum)
    assert comparisons[("SAGE", "ERM")].p_adjusted == pytest.approx(14 * 2 / 2**10, rel=1e-9)
    assert comparisons[("SAGM", "SAM")].p_adjusted == pytest.approx(8 * 2 / 2**9, rel=1e-9)
    sam = comparisons[("SAM", "ERM")]
    assert sam.n == 9 and sam.mean == pytest.approx(0.104, abs=1e-12)
    assert sam.p == pytest.approx(2 / 2**9, rel=1e-9)
    assert comparisons[("SAGE", "ERM")].mean == pytest.approx(0.05, abs=1e-12)
    assert comparisons[("SAGE (default)", "ERM")].mean == pytest.approx(0.15, abs=1e-12)
    assert comparisons[("SAGM", "ERM")].mean == pytest.approx(0.02, abs=1e-12)
    table = rep.dg_table(selected, *SYMBOLA, "symbola", arms=arms)
    rows = _rows(table)
    assert list(rows) == ["ERM", "SAM", *others]
    assert rows["SAM"][1] == "9" and rows["ERM"][1] == "10"
    assert rows["SAM"][3].startswith("+10.4 [") and rows["SAGE"][3].startswith("+5.0 [+5.0, +5.0]")
    assert rows["SAGM"][3].startswith("+2.0 [+2.0, +2.0]") and rows["ERM"][3] == "–"
    assert "training-domain validation" in table
    # the oracle: SAM rho 0.1, 0.50 + 0.02 t, against ERM -0.10 + 0.01 t over trials 0-8: mean -6;
    # SAGE: its default, 15 points above ERM
    o_acc, o_comparisons = rep.cell_comparisons(oracle, *SYMBOLA, arms)
    assert o_comparisons[("SAM", "ERM")].mean == pytest.approx(-0.06, abs=1e-12)
    assert o_comparisons[("SAGE", "ERM")].mean == pytest.approx(0.15, abs=1e-12)
    assert o_acc["SAM"] == {t: pytest.approx(0.50 + 0.02 * t) for t in range(9)}
    o_keys = sorted(o_comparisons)
    assert len(o_keys) == 14
    assert [o_comparisons[k].p_adjusted for k in o_keys] == pytest.approx(
        _holm([o_comparisons[k].p for k in o_keys]), rel=1e-12
    )


def test_rendered_document_and_figures(study, tmp_path):
    root, finished, _, missing = study
    text = ptr.render_pretrained(root, tmp_path / "figures")
    assert text.startswith(f"Pretrained-regime runs finished: {finished}; not finished: {missing}.")
    assert "Not shown until two trials of ERM have finished there: EmojiStyles notocolor." in text
    assert "test domain notocolor" not in text
    captions = [part for part in text.split("\n\n") if part.startswith("**")]
    assert captions == [
        "**EmojiStyles, test domain symbola: core comparison, one choice per method (SAM at rho 0.05; "
        "SAGE at its defaults and at the authors' DG values), nothing selected**",
        "**EmojiStyles, test domain symbola: SAGE's halves at its defaults (the ablations), one choice "
        "per method**",
        "**EmojiStyles, test domain symbola: training-domain validation**",
        "**EmojiStyles, test domain symbola: oracle selection (the choice with the best accuracy on the "
        "test domain's out split; it peeks at the test domain, an upper reference, not a result)**",
    ]
    start = [text.index(c) for c in captions]
    core, validation, oracle = text[start[0] : start[1]], text[start[2] : start[3]], text[start[3] :]
    # the core table: SAM is rho 0.05 itself (9 trials: trial 9's rho 0.05 is not finished), the
    # default SAGE run 15 points above ERM, the authors' run 2; four methods, no grid rows
    core_rows = _rows(core)
    assert list(core_rows) == ["ERM", "SAM", "SAGE (default)", "SAGE (authors-dg)"]
    assert core_rows["SAM"][1] == "9" and core_rows["SAM"][3].startswith("+10.4 [")
    assert core_rows["SAGE (default)"][3].startswith("+15.0 [+15.0, +15.0]")
    assert core_rows["SAGE (authors-dg)"][3].startswith("+2.0 [+2.0, +2.0]")
    assert _rows(validation)["SAM"][3].startswith("+10.4 [")
    assert _rows(oracle)["SAM"][3].startswith("-6.0 [") and _rows(oracle)["SAM"][1] == "9"
    assert _rows(oracle)["SAGE"][3].startswith("+15.0 [+15.0, +15.0]")
    # which grid choice each selection picked: SAM's rho 0.05 by validation, 0.1 by the oracle (9
    # trials); SAGE's (weight, 0.01) by validation, its default by the oracle (10)
    sage = "rho_scaling {}, rho {}, gamma 0.001, disagreement normalized_std (10 trials)"
    assert f"Chosen in each trial: SAM rho 0.05 (9 trials); SAGE {sage.format('weight', 0.01)}." in validation
    assert f"Chosen in each trial: SAM rho 0.1 (9 trials); SAGE {sage.format('global', 0.05)}." in oracle
    assert "Chosen in each trial" not in core
    for name in (
        "pretrained_core_differences.png",
        "pretrained_differences.png",
        "pretrained_sensitivity.png",
    ):
        assert f"figures/{name}" in text
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_core_comparison_stands_before_any_grid_finishes(tmp_path):
    """Only the core part's runs, two trials: the core table and no SAM or SAGE-grid row elsewhere."""
    root = tmp_path / "runs"
    for job in pt_jobs(str(root), cells=(SYMBOLA,), n_trials=2, core=True):
        _finish(job, *_accuracies(job))
    runs, _ = ptr.load_pt(root)
    assert {r.method for r in ptr.core_runs(runs)} == {"ERM", "SAM", "SAGE (default)", "SAGE (authors-dg)"}
    text = ptr.render_pretrained(root, tmp_path / "figures")
    blocks = text.split("**EmojiStyles, test domain symbola: ")
    core, validation = blocks[1], blocks[2]
    assert list(_rows(core)) == ["ERM", "SAM", "SAGE (default)", "SAGE (authors-dg)"]
    # the full table waits for every choice of SAM's and SAGE's grids
    assert list(_rows(validation)) == ["ERM", "SAGE (default)", "SAGE (authors-dg)"]
    assert "classifier's ascent direction" not in text  # the follow-up has no run yet


def test_a_diverged_arm_is_left_out_of_the_core_figure_and_said_so(tmp_path):
    root = tmp_path / "runs"
    for job in pt_jobs(str(root), cells=(SYMBOLA,), n_trials=3):
        val, test, oracle = _accuracies(job)
        if job.settings["hparams"].get("optimizer") == "sgd":  # the authors' arm at chance
            test = 0.1
        _finish(job, val, test, oracle)
    text = ptr.render_pretrained(root, tmp_path / "figures")
    # both figures, the core comparison's and the selected table's, leave it out and say so
    for name in ("pretrained_core_differences.png", "pretrained_differences.png"):
        line = next(x for x in text.splitlines() if f"figures/{name}" in x)
        assert line.endswith("(SAGE (authors-dg): more than 20 points below ERM, in the table only)")
    line = next(x for x in text.splitlines() if "pretrained_core_differences.png" in x)
    assert "| SAGE (authors-dg) |" in text.replace("  ", " ").replace("  ", " ")
    assert (tmp_path / "figures" / "pretrained_core_differences.png").exists()


def test_the_classifier_direction_follow_up_against_erm_and_sages_default(tmp_path):
    root = tmp_path / "runs"
    for job in pt_jobs(str(root), cells=(SYMBOLA,), n_trials=3, core=True) + pt_jobs(
        str(root), cells=(SYMBOLA,), n_trials=3, heads=True
    ):
        _finish(job, *_accuracies(job))
    runs, missing = ptr.load_pt(root)
    assert missing == 130 * 2 - 3 * 4  # the follow-up's runs are not the study's
    assert sum(r.method.startswith("SAGE (classifier") for r in runs) == 6
    text = ptr.render_pretrained(root, tmp_path / "figures")
    table = text.split("classifier's ascent direction")[1]
    rows = _rows(table.split("\n\n", 2)[1])
    assert list(rows) == ["ERM", "SAGE (default)", "SAGE (classifier gradient)", "SAGE (classifier none)"]
    assert "Δ vs SAGE (default)" in table
    # against ERM (0.60 + 0.01 t): +10 and +18; against SAGE's default (0.75 + 0.01 t): -5 and +3
    assert rows["SAGE (classifier gradient)"][3].startswith("+10.0 [+10.0, +10.0]")
    assert rows["SAGE (classifier gradient)"][4].startswith("-5.0 [-5.0, -5.0]")
    assert rows["SAGE (classifier none)"][4].startswith("+3.0 [+3.0, +3.0]")
    assert rows["SAGE (default)"][4] == "–" and rows["ERM"][3] == "–"


def test_no_runs_yet_is_one_line_and_no_figure(tmp_path):
    assert ptr.render_pretrained(tmp_path / "none", tmp_path / "figures") == ptr.NO_RUNS + "\n"
    assert not (tmp_path / "figures").exists()


def test_records_round_trip_and_old_lines(study, tmp_path):
    from torchsage.study.records import export, load, load_pretrained
    from torchsage.study.render import render, render_results

    root, _, runs, missing = study
    path = export(root, tmp_path / "records.jsonl")
    pt_runs, pt_missing, payloads = load_pretrained(path)
    assert pt_missing == missing and len(pt_runs) == len(runs) and payloads == []
    assert {r.oracle_acc for r in pt_runs} == {0.5, 0.99}
    from_dirs = ptr.render_pretrained(root, tmp_path / "f1")
    assert ptr.render_pretrained_runs(pt_runs, pt_missing, tmp_path / "f2") == from_dirs
    # the first study's document leaves the pretrained runs out
    assert render_results(*load(path), tmp_path / "f3") == render(root, tmp_path / "f4")
    assert "EmojiStyles" not in render(root, tmp_path / "f4")
    # a file exported before the regime: no oracle_acc, no pt_missing
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all("oracle_acc" in line for line in lines if line["kind"] == "dg")
    old = [{k: v for k, v in line.items() if k not in ("oracle_acc", "pt_missing")} for line in lines]
    old_path = tmp_path / "old.jsonl"
    old_path.write_text("".join(json.dumps(line) + "\n" for line in old))
    old_runs, old_missing, _ = load_pretrained(old_path)
    assert old_missing is None and {r.oracle_acc for r in old_runs} == {None}
    with pytest.raises(ValueError, match="no oracle_acc to select by"):
        ptr.render_pretrained_runs(old_runs, None, tmp_path / "f5")


def test_pretrained_only_export_keeps_the_other_lines(study, tmp_path, capsys):
    from torchsage.study.__main__ import main
    from torchsage.study.records import load, load_pretrained

    root, _, runs, missing = study
    # a records file of the first study alone (one run line, one MTL line), from another machine
    other = {"kind": "dg", "dataset": "RotatedDigits", "test_env": 0, "trial": 0, "method": "ERM"}
    other.update(hparams={}, val_acc=0.9, test_acc=0.8, run="abc", disagreement=None)
    mtl = {"kind": "mtl", "solver": "ls", "seed": 0, "delta_m": 1.5}
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in ({"kind": "summary", "dg_missing": 7}, other, mtl)))
    for _ in range(2):  # twice: the pretrained lines are replaced, not appended again
        assert main(["export", "--root", str(root), "--output", str(path), "--pretrained-only"]) == 0
    first, first_missing, mtl_rows, _ = load(path)
    assert first_missing == 7 and mtl_rows == [{k: v for k, v in mtl.items() if k != "kind"}]
    assert next(r for r in first if r.dataset == "RotatedDigits").test_acc == 0.8
    pt_runs, pt_missing, _ = load_pretrained(path)
    assert pt_missing == missing and len(pt_runs) == len(runs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(other) + "\n")
    capsys.readouterr()
    assert main(["export", "--root", str(root), "--output", str(bad), "--pretrained-only"]) == 2
    assert "does not start with a summary line" in capsys.readouterr().err


def test_committed_pretrained_results_render_from_the_committed_records(tmp_path):
    from torchsage.study.__main__ import PT_TITLE
    from torchsage.study.records import load_pretrained

    docs = Path(__file__).resolve().parents[2] / "docs"
    runs, missing, payloads = load_pretrained(docs / "study_records.jsonl")
    text = ptr.render_pretrained_runs(runs, missing, tmp_path, payloads)
    assert (docs / "study_pretrained_results.md").read_text() == PT_TITLE + text


def test_one_report_command_writes_both_documents(study, tmp_path, capsys):
    from torchsage.study.__main__ import PT_TITLE, main

    root, finished, _, missing = study
    out, pt_out = tmp_path / "results.md", tmp_path / "pt.md"
    argv = ["report", "--root", str(root), "--output", str(out), "--figures", str(tmp_path / "figures")]
    assert main([*argv, "--pretrained-output", str(pt_out)]) == 0
    assert f"wrote {out} and {pt_out}" in capsys.readouterr().out
    first = f"Pretrained-regime runs finished: {finished}; not finished: {missing}."
    assert pt_out.read_text().startswith(PT_TITLE + first)
    assert "EmojiStyles" not in out.read_text()
    assert (tmp_path / "figures" / "pretrained_sensitivity.png").exists()


def test_the_ablations_table_against_erm_and_sages_default(tmp_path):
    root = tmp_path / "runs"
    core = pt_jobs(str(root), cells=(SYMBOLA,), n_trials=3, core=True)
    for job in core + pt_jobs(str(root), cells=(SYMBOLA,), n_trials=2, ablations=True):
        _finish(job, *_accuracies(job))
    text = ptr.render_pretrained(root, tmp_path / "figures")
    assert "classifier's ascent direction" not in text  # no run of that follow-up
    table = text.split("SAGE's halves at its defaults (the ablations)")[1]
    rows = _rows(table.split("\n\n", 2)[1])
    assert list(rows) == ["ERM", "SAGE (default)", "SAGE_CurvatureOnly", "SAGE_AlignmentOnly"]
    # the ablations' test accuracy is 0.62 + 0.01 t: ERM + 2 and SAGE's default (0.75 + 0.01 t) - 13,
    # paired over the two trials they have (ERM and SAGE's default have three)
    for half in ("SAGE_CurvatureOnly", "SAGE_AlignmentOnly"):
        assert rows[half][3].startswith("+2.0 [+2.0, +2.0]")
        assert rows[half][4].startswith("-13.0 [-13.0, -13.0]")
    # one finished trial is not a table
    one = tmp_path / "one"
    for job in pt_jobs(str(one), cells=(SYMBOLA,), n_trials=3, core=True):
        _finish(job, *_accuracies(job))
    for job in pt_jobs(str(one), cells=(SYMBOLA,), n_trials=1, ablations=True):
        _finish(job, *_accuracies(job))
    assert "the ablations" not in ptr.render_pretrained(one, tmp_path / "f2")


def _theory_payload(job, i, layer="classifier"):
    """A measured run's theory.json: the gap rises 0.02 per decade of the alignment term."""
    report = {
        "alignment": 10.0 ** (i / 4),
        "negative_curvature": False,
        "curvature_trace": 100.0 * (1 + i % 3),
    }
    report.update(curvature_trace_stderr=5.0, curvature_top=[40.0 + i], curvature_top_residuals=[0.0])
    report.update(alignment_residuals=1e-5, cg_iterations=[4, 5])
    s = job.settings
    return {"run": job.output_dir.name, "dataset": s["dataset"], "algorithm": s["algorithm"],
            "test_envs": [s["test_env"]], "gap": 0.05 + 0.005 * i, "settings": {"layer": layer},
            "report": report}  # fmt: skip


def _fit_runs(block):
    """The ``runs`` column of a fit table's rows."""
    return {line.split("|")[3].strip() for line in block.splitlines() if line.startswith("| all runs")}


def test_the_last_layer_theory_test_in_the_pretrained_document(tmp_path, capsys):
    from torchsage.study.__main__ import main
    from torchsage.study.records import export, export_pretrained, load, load_pretrained
    from torchsage.study.render import load_results, render, render_results

    root = tmp_path / "runs"
    core = pt_jobs(str(root), cells=(SYMBOLA,), n_trials=2, core=True)
    for i, job in enumerate(core):
        val, test, oracle = _accuracies(job)
        _finish(job, 0.15 if i == 0 else val, test, oracle)  # run 0 at chance (10 classes): not trained
        # the last run measured on every layer: not the last layer's terms, left out of the table
        payload = _theory_payload(job, i, layer="all" if i == len(core) - 1 else "classifier")
        (job.output_dir / "theory.json").write_text(json.dumps(payload))
    first = {
        "run": "x",
        "dataset": "RotatedDigits",
        "test_envs": [0],
        "gap": 0.1,
        "report": {"alignment": None},
    }
    (root / "dg" / "x").mkdir()
    (root / "dg" / "x" / "theory.json").write_text(json.dumps(first))

    text = ptr.render_pretrained(root, tmp_path / "f1")
    caption = (
        "**Pretrained regime: out-of-domain gap regressed on the last layer's terms (the classifier's "
        "Hessian and gradients only, on cached penultimate features), 7 measured runs; 6 of them trained "
        "(training-domain validation at least chance + 0.1, the first study's filter)**"
    )
    trained = (
        "**The same fits on the sampled runs that trained (training-domain validation at least chance "
        "+ 0.1): 6 of 7**"
    )
    assert caption in text and trained in text
    before, after = text.split(caption)[1].split(trained)
    assert _fit_runs(before) == {"7"} and _fit_runs(after) == {"6"}
    figure = "![out-of-domain gap against the last layer's terms, pretrained regime]"
    assert f"{figure}(figures/pretrained_theory.png)" in text
    assert (tmp_path / "f1" / "pretrained_theory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table only with payloads
    runs, missing = ptr.load_pt(root)
    bare = ptr.render_pretrained_runs(runs, missing, tmp_path / "f2")
    assert "last layer" not in bare and bare == text[: text.index(caption)].rstrip("\n") + "\n"
    assert not (tmp_path / "f2" / "pretrained_theory.png").exists()

    # the first study's document leaves the pretrained payloads out, as it leaves its runs out
    first_runs, first_missing, mtl, payloads = load_results(root)
    assert len(payloads) == len(core) + 1
    first_text = render(root, tmp_path / "f3")
    assert first_text == render_results(first_runs, first_missing, mtl, [first], tmp_path / "f4")
    assert "EmojiStyles" not in first_text

    # records: the export carries the payloads, both documents render from it as from the runs
    path = export(root, tmp_path / "records.jsonl")
    pt_runs, pt_missing, pt_payloads = load_pretrained(path)
    assert pt_payloads == ptr.load_pt_theory(root) and len(pt_payloads) == len(core)
    assert ptr.render_pretrained_runs(pt_runs, pt_missing, tmp_path / "f5", pt_payloads) == text
    assert render_results(*load(path), tmp_path / "f6") == first_text
    # replacing the pretrained lines replaces its payloads (a stale one goes) and keeps the first study's
    stale = {**pt_payloads[0], "run": "stale"}
    lines = [{"kind": "summary", "dg_missing": 3}, {"kind": "theory", **first}, {"kind": "theory", **stale}]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for _ in range(2):
        export_pretrained(root, other)
    assert load(other)[3] == [first, *pt_payloads] and load_pretrained(other)[2] == pt_payloads
    # the report command hands them to the pretrained document
    pt_out = tmp_path / "pt.md"
    argv = [
        "report",
        "--records",
        str(path),
        "--output",
        str(tmp_path / "r.md"),
        "--figures",
        str(tmp_path / "f7"),
    ]
    assert main([*argv, "--pretrained-output", str(pt_out)]) == 0
    assert caption in pt_out.read_text() and "EmojiStyles" not in (tmp_path / "r.md").read_text()


def test_the_gamma_follow_up_table_reads_the_curvature_ablation_as_gamma_zero(tmp_path):
    root = tmp_path / "runs"
    core = pt_jobs(str(root), cells=(SYMBOLA,), n_trials=3, core=True)
    for job in core + pt_jobs(str(root), cells=(SYMBOLA,), n_trials=3, ablations=True):
        _finish(job, *_accuracies(job))
    # gamma 1e-4: 0.70 + 0.01 t (ERM + 10, SAGE's default - 5); gamma 1e-5 in two trials only:
    # 0.63 + 0.02 t (ERM + 3 and + 4, SAGE's default - 12 and - 11)
    for job in pt_jobs(str(root), cells=(SYMBOLA,), n_trials=3, gamma=True):
        t, gamma = job.settings["trial"], job.settings["hparams"]["gamma"]
        if gamma == 1e-4:
            _finish(job, 0.9, 0.70 + 0.01 * t, 0.5)
        elif t < 2:
            _finish(job, 0.9, 0.63 + 0.02 * t, 0.5)
    runs, missing = ptr.load_pt(root)
    assert missing == 130 * 2 - 3 * 6  # the follow-up's runs are not the study's
    assert sum(r.method.startswith("SAGE (gamma") for r in runs) == 5
    text = ptr.render_pretrained(root, tmp_path / "figures")
    table = text.split("SAGE's noise scale (SAGE at its defaults, gamma 1e-3; SAGE_CurvatureOnly is gamma 0)")
    assert len(table) == 2
    rows = _rows(table[1].split("\n\n", 2)[1])
    order = ["ERM", "SAGE (default)", "SAGE (gamma 1e-4)", "SAGE (gamma 1e-5)", "SAGE_CurvatureOnly"]
    assert list(rows) == order
    assert [rows[m][1] for m in order] == ["3", "3", "3", "2", "3"]
    assert rows["SAGE (gamma 1e-4)"][3].startswith("+10.0 [+10.0, +10.0]")
    assert rows["SAGE (gamma 1e-4)"][4].startswith("-5.0 [-5.0, -5.0]")
    assert rows["SAGE (gamma 1e-5)"][3].startswith("+3.5 [+3.0, +4.0]")
    assert rows["SAGE (gamma 1e-5)"][4].startswith("-11.5 [-12.0, -11.0]")
    assert rows["SAGE_CurvatureOnly"][3].startswith("+2.0 [+2.0, +2.0]")  # 0.62 + 0.01 t
    # one trial of gamma 1e-5 in common with 1e-4 is not a table
    for job in pt_jobs(str(root), cells=(SYMBOLA,), n_trials=3, gamma=True):
        if job.settings["hparams"]["gamma"] == 1e-5 and job.settings["trial"] == 1:
            (job.output_dir / "done").unlink()
    assert "SAGE's noise scale" not in ptr.render_pretrained(root, tmp_path / "f2")
