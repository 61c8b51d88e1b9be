"""Where a study's units run: threads of this process (`local`), or SLURM jobs (`slurm`). One interface, two backends.

Both take a `Unit` (`study_units`) and give back a job the coordinator polls; a job does the unit through
`study_units.execute`, so a run's record is the same whichever launcher ran it. `local` starts each unit in a thread
of the study process; its commands end with that process. `slurm` writes a batch script per unit and submits it with
`sbatch`; the job runs `trl-thr study --output_dir DIR --run UNIT`, keeps running when the study process stops, and is
found again by the next one (by the ids recorded in the unit's `slurm_jobs.json`, and by its job name).

SLURM is called through its own commands (`trl_thr.cli.slurm`) rather than a library: a job is a plain batch
script, readable and resubmittable by hand; nothing is pickled, so the nodes need only trl-thr; and a job's fate is
read from the queue (`squeue`, `scontrol`) and from the record it writes, not from `sacct`, which many clusters
restrict or run without (docs/cli.md, "trl-thr study on a SLURM cluster").
"""

import math
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..files import write_json_atomically, write_text_atomically
from . import slurm
from .errors import UsageError
from .study import Study
from .study_locks import Held
from .study_units import Children, Interrupted, Unit, execute

LAUNCHERS = ("local", "slurm")


@dataclass
class LauncherConfig:
    """How a study runs its units: the `launcher:` section of a study config (flags of the same names override it).

    `type: local` (the default) runs them on this machine; `type: slurm` submits each as a SLURM job with the
    resources below (the SLURM fields are read only then).
    """

    type: str = field(default="local", metadata={"help": "Where units run: local (threads of this process) or slurm "
                                                         "(one SLURM job per unit).", "choices": LAUNCHERS})
    max_retries: int | None = field(default=None, metadata={
        "help": "Times a unit whose job ended without its result is started again (a job cancelled, preempted, "
                "timed out or failed). Default: 2 under slurm, 0 locally (a local failure is the run's own)."})
    workers: int = field(default=1, metadata={"help": "local: units at a time in this process."})
    partition: str | None = field(default=None, metadata={"help": "slurm: partition (sbatch --partition); default: "
                                                                  "the cluster's default partition."})
    account: str | None = field(default=None, metadata={"help": "slurm: account to charge (sbatch --account)."})
    qos: str | None = field(default=None, metadata={"help": "slurm: quality of service (sbatch --qos)."})
    time: str | None = field(default=None, metadata={
        "help": "slurm: time limit of one job, as sbatch --time takes it (e.g. 24:00:00, 2-00:00:00); default: the "
                "partition's."})
    nodes: int = field(default=1, metadata={"help": "slurm: nodes per job (above 1, training spans them with srun)."})
    gpus_per_node: int | None = field(default=None, metadata={
        "help": "slurm: GPUs per node (sbatch --gpus-per-node); a run must use them all (num_processes)."})
    cpus_per_task: int | None = field(default=None, metadata={"help": "slurm: CPUs per node (sbatch "
                                                                      "--cpus-per-task)."})
    mem: str | None = field(default=None, metadata={"help": "slurm: memory per node (sbatch --mem, e.g. 256G)."})
    sbatch_options: list[str] = field(default_factory=list, metadata={
        "help": "slurm: more sbatch options, each as on sbatch's command line (e.g. --constraint=h100 --exclusive)."})
    setup: list[str] = field(default_factory=list, metadata={
        "help": "slurm: shell lines run before the unit, e.g. 'module load cuda/12.4' 'source venv/bin/activate'."})
    python: str | None = field(default=None, metadata={
        "help": "slurm: the Python that runs trl-thr on the nodes; default: the one running this command (a shared "
                "file system), or `python` when setup is given."})
    poll_seconds: float = field(default=30.0, metadata={"help": "slurm: seconds between two looks at the queue."})
    max_jobs: int | None = field(default=None, metadata={"help": "slurm: jobs in the queue at once (default: all "
                                                                 "units at once)."})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, where: str = "launcher") -> "LauncherConfig":
        """Checked field by field: one line naming a field that is unknown or of the wrong type."""
        known = cls.field_names()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)}; a launcher has {', '.join(known)}.")
        if isinstance(values.get("setup"), str):
            values = {**values, "setup": [values["setup"]]}  # one line
        config = cls(**values)
        for spec in fields(cls):
            value = getattr(config, spec.name)
            expected = FIELD_TYPES[spec.name]
            if not (value is None and spec.default is None) and not expected[0](value):
                raise UsageError(f"{where}.{spec.name}={value!r} must be {expected[1]}.")
        if config.type not in LAUNCHERS:
            raise UsageError(f"{where}.type={config.type!r} must be one of {', '.join(LAUNCHERS)}.")
        for name in ("workers", "nodes", "gpus_per_node", "cpus_per_task", "max_jobs"):
            if getattr(config, name) is not None and getattr(config, name) < 1:
                raise UsageError(f"{where}.{name}={getattr(config, name)} must be 1 or more.")
        if config.max_retries is not None and config.max_retries < 0:
            raise UsageError(f"{where}.max_retries={config.max_retries} must be 0 or more.")
        if config.poll_seconds <= 0:
            raise UsageError(f"{where}.poll_seconds={config.poll_seconds} must be above 0.")
        if config.time is not None and not slurm.TIME_LIMIT.match(str(config.time)):
            raise UsageError(f"{where}.time={config.time!r} is not a time sbatch reads: minutes, HH:MM:SS or "
                             "D-HH:MM:SS (e.g. 24:00:00).")
        return config

    @property
    def retries(self) -> int:
        if self.max_retries is not None:
            return self.max_retries
        return 2 if self.type == "slurm" else 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each field holds, and how a refusal describes it.
FIELD_TYPES = {
    "type": (lambda v: isinstance(v, str), "local or slurm"),
    "max_retries": (_is_int, "an integer"), "workers": (_is_int, "an integer"),
    "partition": (lambda v: isinstance(v, str), "a string"), "account": (lambda v: isinstance(v, str), "a string"),
    "qos": (lambda v: isinstance(v, str), "a string"),
    "time": (lambda v: isinstance(v, str) or _is_int(v), "a time limit (minutes, or a string like 24:00:00)"),
    "nodes": (_is_int, "an integer"), "gpus_per_node": (_is_int, "an integer"),
    "cpus_per_task": (_is_int, "an integer"), "mem": (lambda v: isinstance(v, str) or _is_int(v), "a string (256G)"),
    "sbatch_options": (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v), "a list of strings"),
    "setup": (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v), "a list of shell lines"),
    "python": (lambda v: isinstance(v, str), "a string"),
    "poll_seconds": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "max_jobs": (_is_int, "an integer"),
}


# ---- jobs -----------------------------------------------------------------------------------------------------------


@dataclass
class JobStatus:
    """Where a job is: `queued`, `running` or `ended`, with the scheduler's words for it (`detail`)."""

    state: str
    detail: str = ""


class LocalJob:
    """A unit running in a thread of this process."""

    job_id = None

    def __init__(self, unit: Unit, target):
        self.unit = unit
        self.error: BaseException | None = None
        self.started = time.time()
        self.thread = threading.Thread(target=self._run, args=(target,), name=unit.name, daemon=True)
        self.thread.start()

    def _run(self, target) -> None:
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - reported by the coordinator, with the unit's log
            self.error = error

    def status(self) -> JobStatus:
        if self.thread.is_alive():
            return JobStatus("running")
        return JobStatus("ended", "" if self.error is None else str(self.error))

    def describe(self) -> str:
        return f"{self.unit.name}"


class LocalLauncher:
    """Units in threads of this process, `workers` at a time."""

    kind = "local"

    def __init__(self, config: LauncherConfig, study: Study, root: Path, provenance: dict):
        self.config, self.study, self.root, self.provenance = config, study, root, provenance
        self.children = Children()
        self.capacity = config.workers
        self.poll_seconds = 0.5

    def describe(self) -> str:
        return f"{self.config.workers} local worker(s)"

    def submit(self, unit: Unit) -> LocalJob:
        return LocalJob(unit, lambda: execute(self.study, self.root, unit, self.provenance, self.children))

    def poll(self, jobs: list[LocalJob]) -> dict[str, JobStatus]:
        return {job.unit.name: job.status() for job in jobs}

    def failure(self, job: LocalJob) -> str:
        if isinstance(job.error, Held):
            return job.error.sentence()
        return str(job.error) if job.error is not None else "it ended without its result"

    def reattach(self, units: list[Unit]) -> list:
        return []  # a local unit ends with the study process that ran it

    def stop(self, jobs: list[LocalJob]) -> str:
        """Ctrl-C: stop every command and wait for the threads, which release their locks."""
        self.children.stop()
        for job in jobs:
            job.thread.join()
        return f"{len(jobs)} unit(s) stopped and their locks released" if jobs else ""

    def interrupted(self, job: LocalJob) -> bool:
        return isinstance(job.error, Interrupted)


class SlurmJob:
    """A unit submitted to SLURM (one attempt of it)."""

    def __init__(self, unit: Unit, job_id: str, output: Path):
        self.unit, self.job_id, self.output = unit, job_id, output
        self.started = time.time()
        self.final: tuple[str, str | None] | None = None

    def describe(self) -> str:
        return f"{self.unit.name} (job {self.job_id})"


def job_name(study_id: str, unit: Unit) -> str:
    """The SLURM job name of a unit: found again by it if the study stopped before recording the job's id."""
    return f"trl-thr-{study_id}-{unit.name}"


class SlurmLauncher:
    """Units as SLURM jobs, `max_jobs` in the queue at a time (default: all of them)."""

    kind = "slurm"
    ATTEMPTS = "slurm_jobs.json"

    def __init__(self, config: LauncherConfig, study: Study, root: Path, study_id: str, cwd: Path | None = None):
        self.config, self.study, self.root, self.study_id = config, study, root, study_id
        self.cwd = (cwd or Path.cwd()).resolve()
        self.capacity = config.max_jobs or math.inf
        self.poll_seconds = config.poll_seconds

    def describe(self) -> str:
        where = f"partition {self.config.partition}" if self.config.partition else "the default partition"
        return f"SLURM ({where})"

    # -- the job script

    def python(self) -> str:
        if self.config.python:
            return self.config.python
        return "python" if self.config.setup else sys.executable

    def directives(self, unit: Unit) -> list[str]:
        """The `#SBATCH` options of a unit's job."""
        options = [f"--job-name={job_name(self.study_id, unit)}",
                   f"--output={unit.directory(self.root) / 'slurm-%j.out'}", f"--chdir={self.cwd}",
                   f"--nodes={self.config.nodes}", "--ntasks-per-node=1"]
        for name, option in (("partition", "partition"), ("account", "account"), ("qos", "qos"), ("time", "time"),
                             ("gpus_per_node", "gpus-per-node"), ("cpus_per_task", "cpus-per-task"), ("mem", "mem")):
            if getattr(self.config, name) is not None:
                options.append(f"--{option}={getattr(self.config, name)}")
        return options + list(self.config.sbatch_options)

    def command(self, unit: Unit) -> str:
        return shlex.join([self.python(), "-m", "trl_thr", "study", "--output_dir", str(self.root), "--run",
                           unit.name])

    def script(self, unit: Unit) -> str:
        lines = ["#!/bin/bash", f"# trl-thr study {self.root}: {unit.name}. Resubmit by hand with: sbatch <this file>"]
        lines += [f"#SBATCH {option}" for option in self.directives(unit)]
        lines += ["set -e", *self.config.setup, f"exec {self.command(unit)}"]
        return "\n".join(lines) + "\n"

    def write_script(self, unit: Unit) -> Path:
        path = unit.directory(self.root) / "job.sh"
        write_text_atomically(path, self.script(unit))
        return path

    # -- checks before anything is submitted

    def check(self, units: list[Unit]) -> None:
        """Refusals in one line before any job is queued: no `sbatch` here, a partition the scheduler does not know,
        options it would reject (`sbatch --test-only` on the first unit's script)."""
        if not slurm.available():
            raise UsageError("--launcher slurm: sbatch is not on the PATH; run the study from a machine that submits "
                             "SLURM jobs (a login node), or use --launcher local.")
        try:
            known = slurm.partitions()
        except slurm.SlurmError as error:
            raise UsageError(f"--launcher slurm: the scheduler does not answer ({error}).") from None
        if self.config.partition is not None and self.config.partition not in [p.rstrip("*") for p in known]:
            raise UsageError(f"launcher.partition={self.config.partition!r} is not a partition of this cluster "
                             f"(sinfo lists {', '.join(known)}).")
        if units:
            import tempfile

            with tempfile.NamedTemporaryFile("w", suffix=".sh") as script:
                script.write(self.script(units[0]))
                script.flush()
                try:
                    slurm.submit(script.name, test_only=True)
                except slurm.SlurmError as error:
                    raise UsageError(f"SLURM would refuse the jobs ({error}); check the launcher section.") from None

    # -- submitting and watching

    def attempts_path(self, unit: Unit) -> Path:
        return unit.directory(self.root) / self.ATTEMPTS

    def attempts(self, unit: Unit) -> list[dict]:
        from .study import read_record

        path = self.attempts_path(unit)
        return read_record(path)["attempts"] if path.exists() else []

    def _write_attempts(self, unit: Unit, attempts: list[dict]) -> None:
        write_json_atomically(self.attempts_path(unit), {"attempts": attempts})

    def submit(self, unit: Unit) -> SlurmJob:
        path = self.write_script(unit)
        try:
            job_id = slurm.submit(str(path))
        except slurm.SlurmError as error:
            raise UsageError(f"{unit.name}: sbatch refused the job ({error}).") from None
        self._write_attempts(unit, [*self.attempts(unit), {"job_id": job_id, "submitted": round(time.time(), 1)}])
        return SlurmJob(unit, job_id, self.output_of(unit, job_id))

    def output_of(self, unit: Unit, job_id: str) -> Path:
        return unit.directory(self.root) / f"slurm-{job_id}.out"

    def reattach(self, units: list[Unit]) -> list[SlurmJob]:
        """The jobs of `units` still queued or running: by the ids the study recorded, and by job name for a job
        submitted just before the study stopped (its id not yet recorded)."""
        recorded = {attempt["job_id"]: unit for unit in units for attempt in self.attempts(unit)[-1:]}
        states = slurm.queued_states(list(recorded))
        live = {job: unit for job, unit in recorded.items() if states.get(job) in slurm.LIVE_STATES}
        names = {job_name(self.study_id, unit): unit for unit in units}
        for job, name in slurm.queued_by_name(set(names)).items():
            unit = names[name]
            if job not in live:
                live[job] = unit
                if job not in recorded:
                    self._write_attempts(unit, [*self.attempts(unit), {"job_id": job, "submitted": None}])
        jobs = {}
        for job, unit in sorted(live.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0):
            jobs[unit.name] = SlurmJob(unit, job, self.output_of(unit, job))  # the latest job of a unit wins
        return list(jobs.values())

    def poll(self, jobs: list[SlurmJob]) -> dict[str, JobStatus]:
        queued = slurm.queued_states([job.job_id for job in jobs])
        statuses = {}
        for job in jobs:
            state = queued.get(job.job_id)
            if state in slurm.LIVE_STATES:
                statuses[job.unit.name] = JobStatus("queued" if state == "PENDING" else "running", state)
                continue
            if job.final is None:
                job.final = slurm.final_state(job.job_id)
                self._record_end(job)
            statuses[job.unit.name] = JobStatus("ended", job.final[0])
        return statuses

    def _record_end(self, job: SlurmJob) -> None:
        attempts = self.attempts(job.unit)
        for attempt in attempts:
            if attempt["job_id"] == job.job_id:
                attempt.update(state=job.final[0], exit_code=job.final[1], ended=round(time.time(), 1))
        self._write_attempts(job.unit, attempts)

    def failure(self, job: SlurmJob) -> str:
        state, exit_code = job.final or (slurm.ENDED, None)
        how = {"CANCELLED": "was cancelled", "TIMEOUT": "reached its time limit", "PREEMPTED": "was preempted",
               "NODE_FAIL": "lost its node", "OUT_OF_MEMORY": "ran out of memory", "FAILED": "failed",
               "COMPLETED": "ended without its result", slurm.ENDED: "ended without its result"}
        exit_text = f", exit code {exit_code}" if exit_code and exit_code != "0:0" else ""
        return (f"job {job.job_id} {how.get(state, f'ended ({state})')}{exit_text}; see {job.output} and "
                f"{job.unit.log(self.root)}")

    def stop(self, jobs: list[SlurmJob]) -> str:
        """Ctrl-C: the jobs keep running; say how to find them again."""
        if not jobs:
            return ""
        ids = " ".join(job.job_id for job in jobs)
        return (f"{len(jobs)} SLURM job(s) keep running ({ids}): run the same command again to watch them and go on, "
                "or add --cancel to cancel them")

    def interrupted(self, job) -> bool:
        return False

    def cancel(self, units: list[Unit]) -> list[str]:
        """Cancel every queued or running job of `units`; their ids."""
        jobs = [job.job_id for job in self.reattach(units)]
        slurm.cancel(jobs)
        return jobs


def make_launcher(config: LauncherConfig, study: Study, root: Path, study_id: str, provenance: dict):
    if config.type == "slurm":
        return SlurmLauncher(config, study, root, study_id)
    return LocalLauncher(config, study, root, provenance)
