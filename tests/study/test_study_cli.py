"""python -m torchsage.study: one-line errors with exit code 2, the plan and an empty report."""

import pytest

from torchsage.study.__main__ import main


def test_unknown_part_is_one_line_exit_2(capsys):
    assert main(["run", "dg-nope", "--root", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown part 'dg-nope'" in err and "dg-rotated-0" in err


def test_bad_option_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["theory", "--max-runs", "0"])
    assert stop.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_plan_and_empty_report(tmp_path, capsys):
    assert main(["plan", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dg-rotated-0" in out and "theory" in out and "all" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    # a subset part's runs (core, ablations) are its cell's runs: the total counts each run once
    assert rows["pt-symbola-core"][-1] == rows["pt-symbola-ablations"][-1] == "pt-symbola)"
    # the schedules follow-up's runs are its own: 20, none done, each budgeted as a two-pass run
    assert rows["pt-symbola-schedules"][:2] == ["20", "0"] and len(rows["pt-symbola-schedules"]) == 4
    assert float(rows["pt-symbola-schedules"][2]) == pytest.approx(20 * (5 + 400 * 1.10) / 3600, abs=0.005)
    from torchsage.study.parts import ALL_PARTS, all_part_jobs

    distinct = {j.output_dir for part in ALL_PARTS for j in all_part_jobs(tmp_path, part) or []}
    assert int(rows["all"][0]) == len(distinct) + int(rows["theory"][0]) + int(rows["theory-pretrained"][0])
    target = tmp_path / "study_results.md"
    pt_target = tmp_path / "study_pretrained_results.md"  # never the repository's docs
    argv = ["report", "--root", str(tmp_path), "--output", str(target), "--figures", str(tmp_path)]
    assert main([*argv, "--pretrained-output", str(pt_target)]) == 0
    assert "no finished runs yet" in pt_target.read_text()
    assert "DG runs finished: 0" in target.read_text()


def test_plan_counts_the_pretrained_theory_payloads_apart(tmp_path, capsys):
    from torchsage.study.parts import all_part_jobs

    # whose run a payload is decides its row: two of the pretrained core part's runs, one of the first study's
    dirs = [j.output_dir for j in all_part_jobs(tmp_path, "pt-symbola-core")[:2]]
    dirs += [all_part_jobs(tmp_path, "dg-rotated-0")[0].output_dir]
    for d in dirs:
        d.mkdir(parents=True)
        (d / "theory.json").write_text("{}")
    assert main(["plan", "--root", str(tmp_path)]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["theory"][:2] == ["80", "1"] and rows["theory-pretrained"][:2] == ["40", "2"]
