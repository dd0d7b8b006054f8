"""The local launcher: a persistent pool of worker processes on this machine.

Each worker is started once (``spawn``), sets its torch CPU threads, and then runs job after job.
A job whose command is ``python -m torchsage ...`` with this interpreter runs inside the worker
(the module run as ``__main__``, as a new process would run it), so torch, the library and the
embedded data sets are imported and built once per worker instead of once per run, which costs
seconds per run. Any other command runs as a subprocess of the worker. Either way the run's
stdout and stderr go to ``out.txt`` and ``err.txt`` in its run directory (file descriptors 1 and 2
are redirected, so C-level output lands there too).

A run that exits non-zero, exits without its ``done`` file, or whose worker dies is recorded as a
failure with the last line of ``err.txt`` and rerun by the next launch; a dead worker is
replaced. On Ctrl-C the workers (and their subprocesses) are terminated, killed after a grace
period, and ``KeyboardInterrupt`` propagates.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from torchsage.harness.jobs import CommandBuilder, Job, SweepSummary, record_exit, sort_failures, todo
from torchsage.harness.progress import Progress

__all__ = ["default_threads", "launch"]

_CHILD: subprocess.Popen | None = None  # the worker's running subprocess, if any


def default_threads(processes: int) -> int:
    """CPU threads per run: the cores divided among ``processes`` runs (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(processes, 1))


def _on_term(signum: int, frame: Any) -> None:
    if _CHILD is not None and _CHILD.poll() is None:
        _CHILD.terminate()
        try:
            _CHILD.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _CHILD.kill()
            _CHILD.wait()
    os._exit(128 + signum)


def _in_process(argv: Sequence[str]) -> int:
    """Runs ``python -m MODULE args`` in this process; returns its exit code."""
    import runpy
    import traceback

    saved = sys.argv
    sys.argv = [argv[2], *argv[3:]]
    try:
        runpy.run_module(argv[2], run_name="__main__", alter_sys=False)
        return 0
    except SystemExit as done:
        code = done.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # a crashed run is a failed run, the worker goes on
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved


def _run(argv: Sequence[str], run_dir: str) -> int:
    """One job in the worker, with fds 1 and 2 redirected to the run's out.txt and err.txt."""
    global _CHILD
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with (
        open(os.path.join(run_dir, "out.txt"), "wb") as out,
        open(os.path.join(run_dir, "err.txt"), "wb") as err,
    ):
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            if len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m":
                return _in_process(argv)
            _CHILD = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL)
            return _CHILD.wait()
        finally:
            _CHILD = None
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _worker(conn: Connection, threads: int) -> None:
    """A pool worker: sets its threads, then runs the jobs it receives until told to stop."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which stops us
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        argv, run_dir = message
        conn.send(_run(argv, run_dir))


class _Worker:
    def __init__(self, context: Any, threads: int) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, threads), daemon=True)
        self.process.start()
        child.close()
        self.job: Job | None = None

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass


def _terminate(workers: Iterable[_Worker], grace: float = 10.0) -> None:
    workers = list(workers)
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
    deadline = time.monotonic() + grace
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.kill()
            w.process.join()


def launch(
    jobs: Iterable[Job],
    processes: int = 1,
    progress: bool = True,
    python: str = sys.executable,
    command_builder: CommandBuilder | None = None,
    threads: int | None = None,
) -> SweepSummary:
    """Runs the jobs that are not done on a pool of ``processes`` worker processes.

    Finished jobs are skipped; unfinished directories are deleted and their jobs rerun from
    scratch. Each job's stdout and stderr go to ``out.txt`` and ``err.txt`` of its run directory.

    Args:
        jobs: the jobs (repeats of the same run directory are launched once).
        processes: how many jobs run at once (worker processes).
        progress: progress on stderr (a bar on a terminal, plain lines otherwise).
        python: the interpreter of the training commands (this one: runs inside the workers).
        command_builder: ``job -> argv``; default ``job.command(python)`` (tests use a fake).
        threads: torch CPU threads of each worker (default :func:`default_threads`; an
            ``OMP_NUM_THREADS`` in the environment wins).
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes!r}")
    summary, left = todo(jobs)
    build = command_builder or (lambda job: job.command(python))
    bar = Progress(summary.total, "sweep", "run", initial=summary.skipped, enabled=progress and bool(left))
    pending = list(reversed(left))  # pop() from the end keeps the original order
    context = multiprocessing.get_context("spawn")
    workers: list[_Worker] = []
    try:
        while pending or any(w.job is not None for w in workers):
            idle = [w for w in workers if w.job is None]
            while pending and (idle or len(workers) < processes):
                worker = idle.pop() if idle else None
                if worker is None:
                    worker = _Worker(context, threads or default_threads(processes))
                    workers.append(worker)
                job = pending.pop()
                argv = list(build(job))
                job.output_dir.mkdir(parents=True, exist_ok=True)
                worker.conn.send((argv, str(job.output_dir)))
                worker.job = job
                summary.launched += 1
            busy = [w for w in workers if w.job is not None]
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for w in busy:
                if w.conn in ready:
                    try:
                        code = int(w.conn.recv())
                    except (EOFError, OSError):
                        code = None
                elif w.process.sentinel in ready:
                    code = None
                else:
                    continue
                if code is None:  # the worker died mid-run: record it, replace the worker
                    w.process.join()
                    code = w.process.exitcode if w.process.exitcode is not None else -1
                    workers.remove(w)
                record_exit(summary, w.job, code)
                w.job = None
                bar.update(1)
                bar.set_postfix(failed=len(summary.failed))
    except BaseException:
        _terminate(workers)
        raise
    else:
        for w in workers:
            w.stop()
        _terminate(workers, grace=30.0)
    finally:
        bar.close()
    sort_failures(summary, left)
    return summary
