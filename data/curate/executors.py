"""datatrove executors from the spec's `run` section: local (default), Slurm or Ray, and a quiet terminal.

Local: datatrove's LocalPipelineExecutor, `run.workers` tasks at once (0: every core this process may use), in this
process when one worker suffices, else in a pool forked from a fork server. The fork server imports datatrove and
loads spaCy's blank English pipeline once (data/curate/warm.py), so that each pool does not pay those ~4 s again
per worker and per stage. Slurm: datatrove's SlurmPipelineExecutor submits one job array per job, each depending on
the one before (sbatch must be on PATH; DIR must be on a filesystem the nodes share). Ray: datatrove's
RayPipelineExecutor on `ray.address` (a running cluster, or a local Ray). datatrove logs every task through loguru,
and prints tqdm bars; all of it goes to DIR/work/logs/ (per task: <job>/logs/task_<rank>.log), not the terminal.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from parallel.errors import UserError

if TYPE_CHECKING:
    from datatrove.executor.base import PipelineExecutor

    from data.curate.spec import CurateConfig
    from data.curate.stages import Job

ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the meshforge packages


def check_executor(executor: str) -> None:
    """A one-line error, before anything is written, when the chosen executor cannot run here."""
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise UserError("run.executor slurm: sbatch is not on PATH (Slurm's client tools are missing here); run "
                        "from a Slurm login node, or use --run.executor local")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise UserError("run.executor ray: the ray package is not installed; pip install 'ray[default]' (and "
                        "start or name a cluster with --ray.address), or use --run.executor local")


def local_workers(workers: int) -> int:
    if workers:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_executor(cfg: CurateConfig, job: Job, logging_dir: str, depends: PipelineExecutor | None = None
                  ) -> PipelineExecutor:
    """The datatrove executor that runs `job` (data/curate/stages.py) as the spec's run section says."""
    run = cfg.run
    if run.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        s = cfg.slurm
        # the jobs unpickle meshforge's steps: let them import meshforge from where this process does (a shared
        # filesystem), after the user's own environment set-up
        env = "\n".join(filter(None, [s.env_command, f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]))
        return SlurmPipelineExecutor(
            pipeline=job.pipeline, tasks=job.tasks, time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
            mem_per_cpu_gb=s.mem_per_cpu_gb, qos=s.qos, job_name=f"{s.job_name}-{job.name}", env_command=env,
            workers=run.workers or -1, logging_dir=logging_dir, depends=depends)
    if run.executor == "ray":
        from datatrove.executor import RayPipelineExecutor

        r = cfg.ray
        return RayPipelineExecutor(pipeline=job.pipeline, tasks=job.tasks, workers=run.workers or -1,
                                   logging_dir=logging_dir, cpus_per_task=r.cpus_per_task,
                                   mem_per_cpu_gb=r.mem_per_cpu_gb)
    from datatrove.executor import LocalPipelineExecutor

    workers = min(local_workers(run.workers), job.tasks)
    if workers > 1:
        start_fork_server()
    return LocalPipelineExecutor(pipeline=job.pipeline, tasks=job.tasks, workers=workers, logging_dir=logging_dir,
                                 start_method="forkserver")


def start_ray(cfg: CurateConfig) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or None, log_to_driver=False)


def start_fork_server() -> None:
    """Start the fork server the local pools fork from, with datatrove and spaCy already loaded. It must find the
    meshforge packages (PYTHONPATH), and its output goes nowhere: each task logs to its own file."""
    import multiprocess
    import multiprocess.forkserver

    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *[p for p in paths if p]])
    multiprocess.set_forkserver_preload(["data.curate.warm"])
    with redirected(os.devnull):
        multiprocess.forkserver.ensure_running()  # returns at once when it already runs


@contextlib.contextmanager
def redirected(path: str):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so child processes and C code too) to
    `path` for the duration; yields a writable stream on the terminal's stderr for the lines meant to be seen."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_err), "w", buffering=1)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        terminal.close()
