"""The schedules part: its runs, their pairing with the every-step arm, and the table."""

import json

import pytest

from torchsage.harness.records import append_json_line, mark_done
from torchsage.study.__main__ import main
from torchsage.study.schedules import load_schedule_records, load_schedule_runs, schedule_table
from torchsage.study.spec import N_TRIALS, PARTS, SAGE_DEFAULTS, part_jobs, schedule_arms


def test_the_part_pairs_three_schedules_on_the_follow_up_cells(tmp_path):
    assert "dg-schedules" in PARTS
    jobs = part_jobs(tmp_path, "dg-schedules")
    assert len(jobs) == 2 * N_TRIALS * 3
    assert [j.settings["dataset"] for j in jobs[:3]] == ["ColoredDigits"] * 3  # the cheaper cell first
    first = [j.settings for j in jobs[:3]]
    assert len({(s["trial"], s["seed"]) for s in first}) == 1  # the three arms share the trial's seed
    schedules = [{k: v for k, v in s["hparams"].items() if k.startswith("ascent")} for s in first]
    assert schedules == [
        {"ascent_every": 1},
        {"ascent_every": 5},
        {"ascent_trigger": "disagreement", "ascent_threshold": 0.0},
    ]
    for arm in schedule_arms():  # SAGE's defaults otherwise
        assert {k: arm.hparams[k] for k in SAGE_DEFAULTS} == SAGE_DEFAULTS


def test_table_from_run_directories(tmp_path):
    jobs = part_jobs(tmp_path, "dg-schedules")
    shift = {1: 0.0, 5: -0.02}
    for job in jobs:
        s = job.settings
        if s["trial"] >= 4 or s["dataset"] != "ColoredDigits":
            continue  # four finished trials of one cell
        every = s["hparams"].get("ascent_every", 0)
        test = 0.3 + 0.01 * s["trial"] + shift.get(every, 0.01)
        record = {"step": 1499, "step_time": 0.02 if every == 1 else 0.01}
        for i in range(3):
            record[f"env{i}_in_acc"] = test if i == s["test_env"] else 0.9
            record[f"env{i}_out_acc"] = 0.8
        job.output_dir.mkdir(parents=True)
        append_json_line(job.output_dir / "results.jsonl", record)
        mark_done(job.output_dir)
    runs, missing = load_schedule_runs(tmp_path)
    assert missing == len(jobs) - 12
    assert runs[("ColoredDigits", 2, "SAGE every 5")][3]["test_acc"] == pytest.approx(0.31)
    text = schedule_table(runs)
    assert "| SAGE every step | 0 | – |" in text  # RotatedDigits: nothing finished
    row = next(line for line in text.splitlines() if line.startswith("| SAGE every 5 | 4"))
    # -2 points in each of 4 trials: exact Wilcoxon p = 2 / 2**4, Holm over two comparisons: 0.25
    assert "-2.0 [-2.0, -2.0] p=0.25" in row and row.endswith("| 10.0 | 0.50 |")
    assert json.dumps(sorted(runs)) == json.dumps(
        sorted([("ColoredDigits", 2, a.method) for a in schedule_arms()])
    )
    records = tmp_path / "records.jsonl"
    assert main(["schedules", "--root", str(tmp_path), "--export", str(records)]) == 0
    assert load_schedule_records(records) == runs  # the table renders the same from the records


def test_committed_records_render_the_documented_table():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    runs = load_schedule_records(root / "docs" / "study_schedules_records.jsonl")
    assert sum(len(trials) for trials in runs.values()) == 60
    assert schedule_table(runs) in (root / "docs" / "study.md").read_text()
