"""The local launcher: up to ``processes`` runs at once on this machine, on warm workers.

A job whose command is ``python -m torchsage ...`` with this interpreter runs in a persistent
worker process (started once with ``spawn``, then given job after job): the module runs there as
``__main__``, as a new process would run it, but torch, the library and the embedded data sets are
imported and built once per worker instead of once per run, which costs seconds per run. Any
other command runs as a subprocess. Either way the run's stdout and stderr go to ``out.txt`` and
``err.txt`` in its run directory (in a worker, file descriptors 1 and 2 are redirected, so
C-level output lands there too).

A run that exits non-zero, exits without its ``done`` file, or whose worker dies is recorded as a
failure with the last line of ``err.txt`` and rerun by the next launch; a dead worker is
replaced. On Ctrl-C the workers and subprocesses are terminated, killed after a grace period,
and ``KeyboardInterrupt`` propagates.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import IO, Any

from torchsage.harness.jobs import CommandBuilder, Job, SweepSummary, record_exit, sort_failures, todo
from torchsage.harness.progress import Progress

__all__ = ["default_threads", "launch"]


def default_threads(processes: int) -> int:
    """CPU threads per run: the cores divided among ``processes`` runs (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(processes, 1))


def _runs_in_worker(argv: Sequence[str]) -> bool:
    return len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m" and argv[2] == "torchsage"


# -- the worker process ---------------------------------------------------------------------------


def _in_process(argv: Sequence[str]) -> int:
    """Runs ``python -m MODULE args`` in this process; returns its exit code."""
    import runpy
    import traceback

    import torch  # imported once per worker (cached afterwards)

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    saved = sys.argv
    sys.argv = [argv[2], *argv[3:]]
    try:
        runpy.run_module(argv[2], run_name="__main__", alter_sys=False)
        return 0
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return int(done.code or 0)
        print(done.code, file=sys.stderr)
        return 1
    except BaseException:  # a crashed run is a failed run, the worker goes on
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved


def _run(argv: Sequence[str], run_dir: str) -> int:
    """One job in the worker, with fds 1 and 2 redirected to the run's out.txt and err.txt."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = open(os.path.join(run_dir, "out.txt"), "wb")
    err = open(os.path.join(run_dir, "err.txt"), "wb")
    try:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        return _in_process(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        out.close()
        err.close()


def _worker(conn: Connection, threads: int) -> None:
    """A pool worker: runs the jobs it receives until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which stops us
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        conn.send(_run(*message))


# -- the launcher ---------------------------------------------------------------------------------


class Worker:
    """One persistent pool worker process (started with the launcher's multiprocessing
    ``context``), given jobs through a pipe until :meth:`stop`. Internal to :func:`launch`, which
    starts one per concurrent run and reuses it; named without an underscore so that tests can
    count the workers started."""

    def __init__(self, context: Any, threads: int) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, threads), daemon=True)
        self.process.start()
        child.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass


@dataclass
class _Running:
    job: Job
    worker: Worker | None = None
    proc: subprocess.Popen | None = None
    files: tuple[IO[bytes], ...] = ()

    def close(self) -> None:
        for f in self.files:
            f.close()


def _popen(job: Job, argv: Sequence[str], threads: int) -> _Running:
    out = open(job.output_dir / "out.txt", "wb")  # closed when the job ends
    err = open(job.output_dir / "err.txt", "wb")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
    except OSError:
        out.close()
        err.close()
        raise
    return _Running(job, proc=proc, files=(out, err))


def _finished(r: _Running, ready: list[Any]) -> int | None:
    """The exit code of a finished run, None while it runs; -N when its worker died (signal N)."""
    if r.proc is not None:
        return r.proc.poll()
    assert r.worker is not None
    if r.worker.conn in ready:
        try:
            return int(r.worker.conn.recv())
        except (EOFError, OSError):
            pass
    elif r.worker.process.sentinel not in ready:
        return None
    r.worker.process.join()
    code = r.worker.process.exitcode
    return code if code not in (None, 0) else -1


def _stop(running: Iterable[_Running], workers: Iterable[Worker], grace: float = 10.0) -> None:
    """Terminates the subprocesses and workers, waits up to ``grace`` seconds, kills the rest."""
    procs = [r.proc for r in running if r.proc is not None]
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
    for r in running:
        r.close()


def launch(
    jobs: Iterable[Job],
    processes: int = 1,
    progress: bool = True,
    python: str = sys.executable,
    command_builder: CommandBuilder | None = None,
    threads: int | None = None,
    poll_interval: float = 0.05,
) -> SweepSummary:
    """Runs the jobs that are not done, up to ``processes`` at a time.

    Finished jobs are skipped; unfinished directories are deleted and their jobs rerun from
    scratch. Each job's stdout and stderr go to ``out.txt`` and ``err.txt`` of its run directory.

    Args:
        jobs: the jobs (repeats of the same run directory are launched once).
        processes: how many jobs run at once (at most this many workers are started).
        progress: progress on stderr (a bar on a terminal, plain lines otherwise).
        python: the interpreter of the training commands (this one: they run in the workers).
        command_builder: ``job -> argv``; default ``job.command(python)`` (tests use a fake).
        threads: torch CPU threads of each run (default :func:`default_threads`; an
            ``OMP_NUM_THREADS`` in the environment wins).
        poll_interval: seconds between polls of the subprocesses.
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes!r}")
    summary, left = todo(jobs)
    build = command_builder or (lambda job: job.command(python))
    threads = threads or default_threads(processes)
    bar = Progress(summary.total, "sweep", "run", initial=summary.skipped, enabled=progress and bool(left))
    pending = list(reversed(left))  # pop() from the end keeps the original order
    context = multiprocessing.get_context("spawn")
    idle: list[Worker] = []
    running: list[_Running] = []
    try:
        while pending or running:
            while pending and len(running) < processes:
                job = pending.pop()
                argv = list(build(job))
                job.output_dir.mkdir(parents=True, exist_ok=True)
                if _runs_in_worker(argv):
                    worker = idle.pop() if idle else Worker(context, threads)
                    worker.conn.send((argv, str(job.output_dir)))
                    running.append(_Running(job, worker=worker))
                else:
                    running.append(_popen(job, argv, threads))
                summary.launched += 1
            waitables = [x for r in running if r.worker for x in (r.worker.conn, r.worker.process.sentinel)]
            timeout = poll_interval if any(r.proc is not None for r in running) else None
            ready = wait(waitables, timeout) if waitables else (time.sleep(poll_interval) or [])
            still = []
            for r in running:
                code = _finished(r, ready)
                if code is None:
                    still.append(r)
                    continue
                r.close()
                if r.worker is not None and r.worker.process.is_alive():
                    idle.append(r.worker)
                record_exit(summary, r.job, code)
                bar.update(1)
                bar.set_postfix(failed=len(summary.failed))
            running = still
    except BaseException:
        _stop(running, [*idle, *(r.worker for r in running if r.worker is not None)])
        raise
    finally:
        bar.close()
    for w in idle:
        w.stop()
    _stop([], idle, grace=30.0)
    sort_failures(summary, left)
    return summary
