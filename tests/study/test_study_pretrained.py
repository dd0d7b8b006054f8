"""The pretrained-regime study's specification: its parts, its arms, and their pairing."""

import json

import pytest

from torchsage.dg.hparams import default_hparams
from torchsage.study import pretrained as pt
from torchsage.study.parts import ALL_PARTS
from torchsage.study.parts import all_part_jobs as part_jobs
from torchsage.study.spec import SAGE_DEFAULTS, SAGE_GRID, SAM_GRID


def test_parts_are_the_cells_and_listed_in_the_study():
    assert pt.PT_PARTS == (
        "pt-symbola-core",
        "pt-symbola",
        "pt-notocolor-core",
        "pt-notocolor",
        "pt-symbola-heads",
        "pt-symbola-ablations",
        "pt-symbola-schedules",
        "pt-symbola-gamma",
    )
    assert set(pt.PT_PARTS) <= set(ALL_PARTS)


def test_a_core_part_is_a_subset_of_its_cell_not_a_copy(tmp_path):
    core = part_jobs(tmp_path, "pt-symbola-core")
    whole = {j.output_dir: j for j in part_jobs(tmp_path, "pt-symbola")}
    # the same directories: runs made by the core part count in the whole cell, and the other way
    assert all(j.output_dir in whole and whole[j.output_dir].argv == j.argv for j in core)
    assert len(core) == 10 * len(pt.PT_CORE_ARMS)
    arms = {(j.settings["algorithm"], json.dumps(j.settings["hparams"], sort_keys=True)) for j in core}
    base = pt.PT_BASE_HPARAMS
    expected = {
        ("ERM", json.dumps(base, sort_keys=True)),
        ("SAM", json.dumps({**base, "rho": 0.05}, sort_keys=True)),
        ("SAGE", json.dumps({**base, **SAGE_DEFAULTS}, sort_keys=True)),
    }
    assert expected <= arms and len(arms) == 4
    authors = [h for a, h in arms if a == "SAGE" and json.loads(h).get("optimizer") == "sgd"]
    assert len(authors) == 1
    # trial by trial: a core part stopped early leaves whole trials
    trials = [j.settings["trial"] for j in core]
    assert trials == sorted(trials)


def test_a_trial_runs_every_arm_once_the_default_shared_with_its_grid_twin(tmp_path):
    jobs = part_jobs(tmp_path, "pt-symbola")
    # ERM + 4 SAM + 4 SAGE (the default among them) + authors-dg + 2 ablations + SAGM
    per_trial = 1 + len(SAM_GRID) + len(SAGE_GRID) + 1 + 2 + 1
    assert SAGE_DEFAULTS in [dict(h) for h in SAGE_GRID]
    assert len(jobs) == 10 * per_trial
    trial0 = [j for j in jobs if j.settings["trial"] == 0]
    assert len({j.output_dir for j in trial0}) == per_trial
    # one seed, one split seed, one held-out design and one step count per trial, for every arm
    assert len({(j.settings["seed"], j.settings["test_env"], j.settings["steps"]) for j in trial0}) == 1
    assert {j.settings["dataset"] for j in jobs} == {"EmojiStyles"}
    assert {j.settings["test_env"] for j in jobs} == {5}


def test_every_run_fine_tunes_the_top_blocks_from_the_trunk_cache(tmp_path):
    for job in part_jobs(tmp_path, "pt-notocolor"):
        hp = job.settings["hparams"]
        assert {k: hp[k] for k in pt.PT_BASE_HPARAMS} == pt.PT_BASE_HPARAMS
        argv = job.argv
        assert json.loads(argv[argv.index("--hparams") + 1]) == hp
        # every override is a hyperparameter the harness knows for this algorithm and data set
        assert set(hp) <= set(default_hparams(job.settings["algorithm"], "EmojiStyles"))


def test_the_authors_arm_has_the_authors_values():
    authors = next(a for a in pt.pt_arms() if a.method == "SAGE (authors-dg)")
    assert authors.hparams["optimizer"] == "sgd" and authors.hparams["gamma"] == 1.0
    assert authors.hparams["rho_scaling"] == "weight" and authors.hparams["disagreement"] == "cosine"


def test_the_heads_follow_up_is_sages_default_with_the_classifier_on_each_direction(tmp_path):
    jobs = part_jobs(tmp_path, "pt-symbola-heads")
    assert len(jobs) == 10 * 2 and {j.settings["test_env"] for j in jobs} == {5}
    core = {j.settings["trial"]: j.settings["seed"] for j in part_jobs(tmp_path, "pt-symbola-core")}
    for job in jobs:  # paired with the core part's trials, SAGE's defaults but the classifier's direction
        hp = job.settings["hparams"]
        assert job.settings["seed"] == core[job.settings["trial"]]
        assert {k: v for k, v in hp.items() if k != "classifier_ascent"} == {
            **pt.PT_BASE_HPARAMS,
            **SAGE_DEFAULTS,
        }
    assert {j.settings["hparams"]["classifier_ascent"] for j in jobs} == {"gradient", "none"}
    with pytest.raises(ValueError, match="unknown part 'pt-notocolor-heads'"):
        part_jobs(tmp_path, "pt-notocolor-heads")


def test_the_ablations_part_is_a_subset_of_its_cell_run_trial_by_trial(tmp_path):
    jobs = part_jobs(tmp_path, "pt-symbola-ablations")
    whole = {j.output_dir: j for j in part_jobs(tmp_path, "pt-symbola")}
    assert len(jobs) == 10 * 2
    assert all(j.output_dir in whole and whole[j.output_dir].argv == j.argv for j in jobs)
    assert [j.settings["trial"] for j in jobs] == sorted(j.settings["trial"] for j in jobs)
    base = {**pt.PT_BASE_HPARAMS, **SAGE_DEFAULTS}
    by_algorithm = {j.settings["algorithm"]: j.settings["hparams"] for j in jobs if j.settings["trial"] == 0}
    # both halves at SAGE's defaults: the curvature half has no noise scale, the alignment half no ascent
    curvature = {k: v for k, v in base.items() if k != "gamma"}
    assert by_algorithm == {"SAGE_CurvatureOnly": curvature, "SAGE_AlignmentOnly": {**base, "rho": 0.0}}
    with pytest.raises(ValueError, match="unknown part 'pt-notocolor-ablations'"):
        part_jobs(tmp_path, "pt-notocolor-ablations")
    with pytest.raises(ValueError, match="at most one of core, heads, ablations, schedules and gamma"):
        pt.pt_jobs(str(tmp_path), core=True, ablations=True)


def _paired_follow_up(root, part):
    """The jobs of follow-up ``part`` and of the core part, after checking that the follow-up has two
    arms in 10 trials on Symbola, run trial by trial with the core part's seeds, in directories of
    its own (none is a run of the cell's whole part)."""
    jobs, core = part_jobs(root, part), part_jobs(root, "pt-symbola-core")
    assert len(jobs) == 10 * 2 and {j.settings["test_env"] for j in jobs} == {5}
    assert [j.settings["trial"] for j in jobs] == sorted(j.settings["trial"] for j in jobs)
    seeds = {j.settings["trial"]: j.settings["seed"] for j in core}
    assert all(j.settings["seed"] == seeds[j.settings["trial"]] for j in jobs)
    assert not {j.output_dir for j in jobs} & {j.output_dir for j in part_jobs(root, "pt-symbola")}
    return jobs, core


def test_the_schedules_follow_up_is_paired_with_the_core_part_whose_default_is_its_every_step_arm(tmp_path):
    from torchsage.dg.algorithms import ascent_schedule
    from torchsage.study.spec import SCHEDULES

    # two arms, 10 trials: the every-step arm is the core part's SAGE (default) run, not run again
    jobs, core = _paired_follow_up(tmp_path, "pt-symbola-schedules")
    base = {**pt.PT_BASE_HPARAMS, **SAGE_DEFAULTS}
    trigger = {"ascent_trigger": "disagreement", "ascent_threshold": 0.0}
    expected = [{**base, "ascent_every": 5}, {**base, **trigger}]
    assert [j.settings["hparams"] for j in jobs if j.settings["trial"] == 0] == expected
    assert {j.settings["algorithm"] for j in jobs} == {"SAGE"}
    assert [(a.method, a.hparams) for a in pt.pt_schedule_arms()] == [
        (m, {**SAGE_DEFAULTS, **h}) for m, h in SCHEDULES if m != "SAGE every step"
    ]
    # the core part's default run is the every-step schedule: the harness's ascent_every defaults to
    # 1, which asks for no schedule at all, and the core run names no schedule key
    defaults = default_hparams("SAGE", "EmojiStyles")
    assert (defaults["ascent_every"], defaults["ascent_trigger"]) == (1, "none")
    assert ascent_schedule({**defaults, "ascent_every": 1}) is None and ascent_schedule(defaults) is None
    default_run = next(j for j in core if j.settings["hparams"] == base and j.settings["trial"] == 0)
    assert not {"ascent_every", "ascent_trigger", "ascent_threshold"} & set(default_run.settings["hparams"])
    for job in jobs:
        assert set(job.settings["hparams"]) <= set(defaults)
    with pytest.raises(ValueError, match="unknown part 'pt-notocolor-schedules'"):
        part_jobs(tmp_path, "pt-notocolor-schedules")
    # not a subset part: plan counts its runs in the total, and names no cell they belong to
    assert not any("pt-symbola-schedules".endswith(s) for s in pt.SUBSET_SUFFIXES)


def test_the_gamma_follow_up_is_sages_default_at_smaller_noise_paired_with_the_core_part(tmp_path):
    jobs, _ = _paired_follow_up(tmp_path, "pt-symbola-gamma")
    base = {**pt.PT_BASE_HPARAMS, **SAGE_DEFAULTS}
    first = [j.settings["hparams"] for j in jobs if j.settings["trial"] == 0]
    # a tenth and a hundredth of the default's noise scale, nothing else changed
    assert first == [
        {**base, "gamma": SAGE_DEFAULTS["gamma"] / 10},
        {**base, "gamma": SAGE_DEFAULTS["gamma"] / 100},
    ]
    assert {j.settings["algorithm"] for j in jobs} == {"SAGE"}
    assert [a.method for a in pt.pt_gamma_arms()] == ["SAGE (gamma 1e-4)", "SAGE (gamma 1e-5)"]
    defaults = default_hparams("SAGE", "EmojiStyles")
    assert all(set(j.settings["hparams"]) <= set(defaults) for j in jobs)
    with pytest.raises(ValueError, match="unknown part 'pt-notocolor-gamma'"):
        part_jobs(tmp_path, "pt-notocolor-gamma")
    assert not any("pt-symbola-gamma".endswith(s) for s in pt.SUBSET_SUFFIXES)
