"""SLURM's own commands, called as a user would: `sbatch`, `squeue`, `scontrol`, `sacct`, `scancel`, `sinfo`.

Nothing here keeps state: each function runs one command and reads its answer. A job's fate is read from the
scheduler in the order it is known: `squeue` while the job is queued or running, `scontrol show job` for a few
minutes after it ends (`MinJobAge`), `sacct` where the cluster keeps accounting. Where none of them knows the job any
more, it is reported as `ENDED`: whoever asks decides from what the job itself wrote.
"""

import re
import shutil
import subprocess

# States in which a job still holds (or waits for) its allocation: https://slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES
LIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
})
ENDED = "ENDED"  # gone from every source this cluster keeps
# `sbatch --time` formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds (https://slurm.schedmd.com/sbatch.html#OPT_time).
TIME_LIMIT = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")


class SlurmError(RuntimeError):
    """A SLURM command failed; the message is the command's own, in one line."""


def available() -> bool:
    """Whether this machine can submit jobs (`sbatch` on the PATH)."""
    return shutil.which("sbatch") is not None


def _run(command: list[str], timeout: float = 60) -> str:
    try:
        process = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{command[0]} is not on the PATH") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(command[:2])}` did not answer within {timeout:.0f} s") from None
    if process.returncode != 0:
        message = " ".join((process.stderr or process.stdout).split()) or f"exit status {process.returncode}"
        raise SlurmError(message if message.startswith(f"{command[0]}: ") else f"{command[0]}: {message}")
    return process.stdout


def submit(script: str, test_only: bool = False) -> str:
    """Submit the batch script at `script`; its job id. `test_only`: let the scheduler check the script's options
    without queueing anything (`sbatch --test-only`), raising its refusal."""
    if test_only:
        _run(["sbatch", "--test-only", script])
        return ""
    output = _run(["sbatch", "--parsable", script]).strip()
    return output.split(";")[0]  # "<id>" or "<id>;<cluster>"


def partitions() -> list[str]:
    """The partitions the scheduler knows (`sinfo`), default first."""
    names = _run(["sinfo", "--noheader", "--format=%P"]).split()
    return sorted(dict.fromkeys(names), key=lambda name: not name.endswith("*"))


def queued_states(job_ids: list[str]) -> dict[str, str]:
    """`{job id: state}` of those of `job_ids` still known to `squeue` (queued, running or just ending)."""
    if not job_ids:
        return {}
    try:
        output = _run(["squeue", "--noheader", "--format=%i %T", f"--jobs={','.join(job_ids)}"])
    except SlurmError as error:
        if "Invalid job id" not in str(error):
            raise
        if len(job_ids) == 1:  # it has left the queue
            return {}
        # Some versions refuse the whole list for one id that has left: ask for each.
        return {job: state for one in job_ids for job, state in queued_states([one]).items()}
    states = {}
    for line in output.splitlines():
        job, _, state = line.strip().partition(" ")
        states[job] = state.strip()
    return states


def queued_by_name(names: set[str]) -> dict[str, str]:
    """`{job id: job name}` of this user's queued or running jobs whose name is in `names`."""
    if not names:
        return {}
    output = _run(["squeue", "--noheader", "--me", "--format=%i %j"])
    jobs = {}
    for line in output.splitlines():
        job, _, name = line.strip().partition(" ")
        if name in names:
            jobs[job] = name
    return jobs


def final_state(job_id: str) -> tuple[str, str | None]:
    """`(state, exit code "code:signal" or None)` of a job that has left the queue: from `scontrol` while the
    controller remembers it, else `sacct`, else `(ENDED, None)`."""
    try:
        output = _run(["scontrol", "--oneliner", "show", "job", job_id])
        fields = dict(item.split("=", 1) for item in output.split() if "=" in item)
        return fields.get("JobState", ENDED), fields.get("ExitCode")
    except SlurmError:
        pass
    try:
        output = _run(["sacct", "--noheader", "--parsable2", "--allocations", "--format=State,ExitCode",
                       f"--jobs={job_id}"])
    except SlurmError:
        return ENDED, None
    for line in output.splitlines():
        state, _, exit_code = line.partition("|")
        if state:
            return state.split()[0], exit_code or None  # "CANCELLED by 0" -> CANCELLED
    return ENDED, None


def state(job_id: str) -> str:
    """The job's state now: its queue state, else its final state."""
    return queued_states([job_id]).get(job_id) or final_state(job_id)[0]


def is_live(job_id: str) -> bool | None:
    """Whether the job still holds or waits for its allocation; `None` where this machine cannot ask SLURM."""
    if shutil.which("squeue") is None:
        return None
    try:
        return queued_states([job_id]).get(job_id) in LIVE_STATES
    except SlurmError:
        return None


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])
