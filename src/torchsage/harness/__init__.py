"""The experiment framework shared by the domain-generalization (:mod:`torchsage.dg`) and
multi-task (:mod:`torchsage.mtl`) harnesses.

* :mod:`.records`: whole-line JSON results, a reader that counts torn lines, the ``done`` file,
  atomic writes of models and text;
* :mod:`.seeds`: canonical JSON, run-directory hashes and stable seeds;
* :mod:`.jobs`: the job model (an argv, a run directory named by the hash of its settings, a
  ``done`` file), resume (skip finished, rerun unfinished) and the sweep summary whose failures
  carry the last stderr line of the run;
* :mod:`.local`: the local launcher, a persistent pool of worker processes;
* :mod:`.submitit`: the Slurm launcher (one job array through submitit);
* :mod:`.progress`: a bar on a terminal, plain periodic lines otherwise;
* :mod:`.tables`: markdown and LaTeX tables, PNG figures;
* :mod:`.style`: colour and marker pairs for the figures' series and counts in words, shared by
  the dg and mtl reports.

The data-parallel session under ``torchrun`` is :func:`torchsage.optim.torchrun_session`.
Importing this package imports neither torch nor the harnesses.
"""

from torchsage.harness.jobs import STATES, HashedJob, JobFailure, SweepSummary, sweep_status
from torchsage.harness.local import launch
from torchsage.harness.progress import Progress, progress
from torchsage.harness.records import append_json_line, atomic_torch_save, is_done, mark_done, read_json_lines
from torchsage.harness.seeds import canonical_json, digest, stable_seed
from torchsage.harness.tables import render_table

__all__ = [
    "STATES",
    "HashedJob",
    "JobFailure",
    "Progress",
    "SweepSummary",
    "append_json_line",
    "atomic_torch_save",
    "canonical_json",
    "digest",
    "is_done",
    "launch",
    "mark_done",
    "progress",
    "read_json_lines",
    "render_table",
    "stable_seed",
    "sweep_status",
]
