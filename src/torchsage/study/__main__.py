"""``python -m torchsage.study``: the evidence study's commands (docs/study.md).

* ``pilot``: the step-count pilot (:mod:`torchsage.study.pilot`);
* ``plan``: every part's runs, how many are finished, and the CPU estimate of what is left;
* ``run PART``: runs one part on the local launcher (resumable: finished runs are skipped,
  unfinished ones restart; Ctrl-C keeps what finished);
* ``theory``: measures the terms on a random sample of finished DG runs (resumable); with
  ``--pretrained``, the classifier's terms on the pretrained regime's core runs;
* ``export``: writes the finished runs' results to one small records file, committed with the
  repository (:mod:`torchsage.study.records`);
* ``report``: renders the tables and figures from the run directories, or with ``--records``
  from an exported file (what a fresh clone has): the first study's into ``--output``, the
  pretrained regime's into ``--pretrained-output`` (:mod:`torchsage.study.pretrained_report`);
* ``schedules``: the table of the ascent-schedules part (:mod:`torchsage.study.schedules`).

Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from torchsage.cli.common import Parser, add_no_progress, positive_int

DEFAULT_ROOT = "runs/study"
DEFAULT_RECORDS = "docs/study_records.jsonl"
DEFAULT_PT_OUTPUT = "docs/study_pretrained_results.md"
#: the title of the pretrained regime's results document
PT_TITLE = "# Evidence study, pretrained regime: results\n\n"
SCHEDULE_RECORDS = "docs/study_schedules_records.jsonl"


def _parser() -> Parser:
    parser = Parser(prog="python -m torchsage.study", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pilot = sub.add_parser("pilot", help="the step-count pilot (ERM and SAGE, one seed each)")
    pilot.add_argument("--output-dir", default=f"{DEFAULT_ROOT}/pilot")
    pilot.add_argument("--steps", type=positive_int, default=2000)
    pilot.add_argument("--checkpoint-freq", type=positive_int, default=100)
    plan = sub.add_parser("plan", help="runs per part, finished, and the CPU estimate of the rest")
    plan.add_argument("--root", default=DEFAULT_ROOT)
    run = sub.add_parser("run", help="run one part of the study (resumable)")
    run.add_argument("part", help="a part named by `plan`")
    run.add_argument("--root", default=DEFAULT_ROOT)
    run.add_argument("--processes", type=positive_int, default=2)
    run.add_argument("--threads", type=positive_int, default=1, help="torch threads per run")
    run.add_argument("--dry-run", action="store_true", help="print what would run")
    theory = sub.add_parser("theory", help="measure the terms on a sample of finished DG runs (resumable)")
    theory.add_argument("--root", default=DEFAULT_ROOT)
    theory.add_argument(
        "--max-runs",
        type=positive_int,
        default=None,
        help="runs in all, the same number from every cell (default 80; with --pretrained 40: all core runs)",
    )
    theory.add_argument(
        "--pretrained",
        action="store_true",
        help="the pretrained regime's pt-symbola-core runs instead, the classifier's terms only",
    )
    theory.add_argument("--seed", type=int, default=0)
    add_no_progress(theory)
    export = sub.add_parser("export", help="write the finished runs' results to one records file")
    export.add_argument("--root", default=DEFAULT_ROOT)
    export.add_argument("--output", default=DEFAULT_RECORDS)
    export.add_argument(
        "--pretrained-only",
        action="store_true",
        help="replace only the pretrained regime's lines of the existing --output file",
    )
    schedules = sub.add_parser(
        "schedules", help="the table of the dg-schedules part, from its run directories"
    )
    source = schedules.add_mutually_exclusive_group()
    source.add_argument("--root", default=DEFAULT_ROOT, help="read the run directories under ROOT")
    source.add_argument("--records", default=None, help=f"read a records file instead ({SCHEDULE_RECORDS})")
    schedules.add_argument("--export", default=None, help="also write the runs' records to this file")
    report = sub.add_parser("report", help="render the tables and figures")
    source = report.add_mutually_exclusive_group()
    source.add_argument("--root", default=DEFAULT_ROOT, help="read the run directories under ROOT")
    source.add_argument(
        "--records", default=None, help=f"read an exported records file instead (e.g. {DEFAULT_RECORDS})"
    )
    report.add_argument("--output", default="docs/study_results.md")
    report.add_argument(
        "--pretrained-output",
        default=DEFAULT_PT_OUTPUT,
        help="where the pretrained regime's results go (default: %(default)s)",
    )
    report.add_argument("--figures", default="docs/figures")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"python -m torchsage.study {args.command}: error: {error}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "pilot":
        import torch

        from torchsage.study.pilot import run_pilot, summary

        torch.set_num_threads(1)
        run_pilot(args.output_dir, steps=args.steps, checkpoint_freq=args.checkpoint_freq)
        print(summary(args.output_dir))
        return 0
    if args.command == "plan":
        from torchsage.study.budget import plan_text

        print(plan_text(args.root))
        return 0
    if args.command == "run":
        from torchsage.harness.local import launch
        from torchsage.study.parts import all_part_jobs

        jobs = all_part_jobs(args.root, args.part)
        if args.dry_run:
            for job in jobs:
                if job.state != "done":
                    print(shlex.join(job.command()))
            return 0
        if args.part == "mtl":
            from torchsage.mtl.sweep import run_sweep

            summary = run_sweep(
                jobs, lambda part: launch(part, processes=args.processes, threads=args.threads)
            )
        else:
            summary = launch(jobs, processes=args.processes, threads=args.threads)
        print(summary)
        return 0 if summary.ok else 1
    if args.command == "theory":
        import torch

        from torchsage.study.theory import measure_sample, sample_cells, sample_pretrained

        torch.set_num_threads(1)
        if args.pretrained:
            sample, left = sample_pretrained(args.root, args.max_runs or 40, args.seed)
            measured = measure_sample(sample, progress=not args.no_progress, layer="classifier")
            if left:
                print(f"{left} run(s) of pt-symbola-core not finished, not in the sample")
        else:
            sample, waiting = sample_cells(args.root, args.max_runs or 80, args.seed)
            measured = measure_sample(sample, progress=not args.no_progress)
            if waiting:
                print(f"cells not finished, sampled once they are: {', '.join(waiting)}")
        print(f"measured {measured} run(s) now; {len(sample)} in the sample")
        return 0
    if args.command == "schedules":
        from torchsage.study import schedules as part

        if args.records is not None:
            runs, missing = part.load_schedule_records(args.records), 0
        else:
            runs, missing = part.load_schedule_runs(args.root)
        if args.export is not None:
            print(f"wrote {part.write_schedule_records(runs, args.export)}")
        print(
            part.schedule_table(runs) + (f"\n{missing} run(s) of the part not finished\n" if missing else "")
        )
        return 0
    if args.command == "export":
        from torchsage.study.records import export, export_pretrained

        path = (export_pretrained if args.pretrained_only else export)(args.root, args.output)
        print(f"wrote {path}")
        return 0
    from torchsage.harness.records import atomic_write_text
    from torchsage.study.pretrained_report import render_pretrained, render_pretrained_runs
    from torchsage.study.render import render, render_results

    if args.records is not None:
        from torchsage.study.records import load, load_pretrained

        text = render_results(*load(args.records), args.figures)
        pt_runs, pt_missing, pt_payloads = load_pretrained(args.records)
        pt_text = render_pretrained_runs(pt_runs, pt_missing, args.figures, pt_payloads)
    else:
        text = render(args.root, args.figures)
        pt_text = render_pretrained(args.root, args.figures)
    atomic_write_text(args.output, "# Evidence study: results\n\n" + text)
    atomic_write_text(args.pretrained_output, PT_TITLE + pt_text)
    print(f"wrote {args.output} and {args.pretrained_output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
