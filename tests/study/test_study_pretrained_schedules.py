"""The pretrained regime's ascent-schedules follow-up in its report, on synthetic run directories:
accuracies and step times chosen so that the paired differences and step-time ratios are known by
hand; no table before two trials of both schedules; the step times through the records file."""

import json
import math

from test_study_pretrained_report import SYMBOLA, _accuracies, _finish, _rows

from torchsage.study import pretrained_report as ptr
from torchsage.study.pretrained import pt_jobs

#: trial t's step time (s) of each method: ERM half of SAGE's default, every 5 0.6 of it, and the
#: trigger 0.8, 0.7 and 0.9 of it (mean ratio 0.80, not the ratio of the means, 4.9 / 6)
STEP_TIMES = {"ERM": (0.5, 1.0, 1.5), "SAGE (default)": (1.0, 2.0, 3.0)}
STEP_TIMES |= {"SAGE every 5": (0.6, 1.2, 1.8), "SAGE trigger D": (0.8, 1.4, 2.7)}


def _method(job):
    hp = job.settings["hparams"]
    if "ascent_every" in hp:
        return "SAGE every 5"
    if "ascent_trigger" in hp:
        return "SAGE trigger D"
    return {"ERM": "ERM", "SAGE": "SAGE (default)"}.get(job.settings["algorithm"])


def _schedule_study(root, core_trials=3, schedule_trials=(3, 3)):
    """The core part's runs (ERM 0.60 + 0.01 t, SAGE's default 0.75 + 0.01 t, as in
    test_study_pretrained_report) and the schedules': every 5 at 0.72 + 0.01 t (ERM + 12, SAGE's
    default - 3), the trigger at 0.76 + 0.02 t (ERM + 16, 17, 18; SAGE's default + 1, 2, 3)."""
    for job in pt_jobs(str(root), cells=(SYMBOLA,), n_trials=core_trials, core=True):
        method, t = _method(job), job.settings["trial"]
        if method in STEP_TIMES and job.settings["hparams"].get("optimizer") != "sgd":
            _finish(job, *_accuracies(job), step_time=STEP_TIMES[method][t])
        else:
            _finish(job, *_accuracies(job))
    every, trigger = schedule_trials
    for job in pt_jobs(str(root), cells=(SYMBOLA,), n_trials=max(every, trigger), schedules=True):
        method, t = _method(job), job.settings["trial"]
        if t >= (every if method == "SAGE every 5" else trigger):
            continue
        test = 0.72 + 0.01 * t if method == "SAGE every 5" else 0.76 + 0.02 * t
        _finish(job, 0.9, test, 0.5, step_time=STEP_TIMES[method][t])


def _table(text):
    marker = "ascent schedules (SAGE at its defaults"
    assert text.count(marker) == 1
    return text.split(marker)[1].split("\n\n", 2)[1], text.split(marker)[1].split("\n\n", 3)[2]


def test_the_schedules_table_against_erm_and_sages_default_with_step_times(tmp_path):
    root = tmp_path / "runs"
    _schedule_study(root)
    runs, missing = ptr.load_pt(root)
    assert missing == 130 * 2 - 3 * 4  # the follow-up's runs are not the study's
    assert sum(r.method.startswith("SAGE every") or r.method == "SAGE trigger D" for r in runs) == 6
    text = ptr.render_pretrained(root, tmp_path / "figures")
    caption = next(line for line in text.splitlines() if "ascent schedules" in line)
    assert caption == (
        "**EmojiStyles, test domain symbola: ascent schedules (SAGE at its defaults; SAGE (default) is "
        "the every-step schedule), one choice per method; the step-time ratio compares separate runs on "
        "a shared machine (noisy)**"
    )
    table, notes = _table(text)
    header = table.splitlines()[0]
    assert [c.strip() for c in header.split("|")[1:-1]][3:] == [
        "Δ vs ERM [95% CI] p",
        "Δ vs SAGE (default) [95% CI] p",
        "step time (s)",
        "step time / SAGE (default)'s",
    ]
    rows = _rows(table)
    assert list(rows) == ["ERM", "SAGE (default)", "SAGE every 5", "SAGE trigger D"]
    assert [rows[m][1] for m in rows] == ["3"] * 4
    assert rows["SAGE every 5"][3].startswith("+12.0 [+12.0, +12.0]")
    assert rows["SAGE every 5"][4].startswith("-3.0 [-3.0, -3.0]")
    assert rows["SAGE trigger D"][3].startswith("+17.0 [")
    assert rows["SAGE trigger D"][4].startswith("+2.0 [")
    assert rows["SAGE (default)"][3].startswith("+15.0 [+15.0, +15.0]") and rows["SAGE (default)"][4] == "–"
    assert rows["ERM"][3] == "–"
    # mean step time over the trials, and the mean of the paired ratios to SAGE's default
    assert {m: rows[m][5] for m in rows} == {
        "ERM": "1.00",
        "SAGE (default)": "2.00",
        "SAGE every 5": "1.20",
        "SAGE trigger D": "1.63",
    }
    assert {m: rows[m][6] for m in rows} == {
        "ERM": "0.50",
        "SAGE (default)": "–",
        "SAGE every 5": "0.60",
        "SAGE trigger D": "0.80",
    }
    assert "wall-clock seconds per step" in notes


def test_no_schedules_table_until_both_schedules_have_two_trials(tmp_path):
    for n, trials in enumerate([(1, 1), (2, 1), (1, 2)]):
        root = tmp_path / f"runs{n}"
        _schedule_study(root, schedule_trials=trials)
        runs, _ = ptr.load_pt(root)
        assert sum(r.method in ("SAGE every 5", "SAGE trigger D") for r in runs) == sum(trials)
        assert "ascent schedules" not in ptr.render_pretrained(root, tmp_path / f"figures{n}")
    root = tmp_path / "two"
    _schedule_study(root, schedule_trials=(2, 2))
    rows = _rows(_table(ptr.render_pretrained(root, tmp_path / "figures"))[0])
    assert rows["SAGE every 5"][1] == "2" and rows["SAGE every 5"][6] == "0.60"


def test_step_times_through_the_records_file_and_old_lines_without_them(tmp_path):
    from torchsage.study.records import export, load_pretrained

    root = tmp_path / "runs"
    _schedule_study(root)
    path = export(root, tmp_path / "records.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    schedules = [x for x in lines if x.get("method") in ("SAGE every 5", "SAGE trigger D")]
    assert len(schedules) == 6 and all("step_time" in x for x in schedules)
    # the authors' runs logged no step time here: their lines have no field (JSON has no nan)
    authors = [x for x in lines if x.get("method") == "SAGE (authors-dg)"]
    assert authors and not any("step_time" in x for x in authors)
    runs, missing, _ = load_pretrained(path)
    from_dirs = ptr.render_pretrained(root, tmp_path / "f1")
    assert ptr.render_pretrained_runs(runs, missing, tmp_path / "f2") == from_dirs
    # lines exported before step times were kept (the core part's committed ones): nan, shown as "–"
    old = tmp_path / "old.jsonl"
    stripped = [{k: v for k, v in x.items() if k != "step_time"} for x in lines]
    old.write_text("".join(json.dumps(x) + "\n" for x in stripped))
    old_runs, *_ = load_pretrained(old)
    assert all(math.isnan(r.step_time) for r in old_runs)
    rows = _rows(_table(ptr.render_pretrained_runs(old_runs, None, tmp_path / "f3"))[0])
    assert {rows[m][5] for m in rows} == {rows[m][6] for m in rows} == {"–"}
    assert rows["SAGE every 5"][4].startswith("-3.0 [-3.0, -3.0]")
