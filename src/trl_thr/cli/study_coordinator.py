"""The `trl-thr study` process: it binds the directory to the design, prepares, keeps every unit going on its launcher
until each has its result or has failed `max_retries` more times, says where things stand, and writes the report.

The coordinator holds no state of its own: what is done is what has a product (`study_units`), who works on a unit
is its lock (`study_locks`), and which SLURM jobs a unit had is its `slurm_jobs.json`. So a coordinator stopped at
any moment (Ctrl-C, a closed terminal, `kill -9`) is replaced by running the same command again: it finds the jobs
still queued or running and watches them instead of submitting them again. Under SLURM one coordinator works on a
directory at a time (`coordinator.lock`); local studies may share a directory between processes of one machine,
each waiting for the units another holds.
"""

import time
from collections import Counter, deque
from contextlib import nullcontext
from pathlib import Path

from .errors import UsageError
from .study import (
    Study,
    bind_directory,
    check_prepare_fields,
    check_same_base,
    read_record,
    read_study_file,
    validate,
    with_recipe_outputs,
)
from .study_launchers import LauncherConfig, make_launcher
from .study_locks import Held, acquire, blocking, describe
from .study_recipes import check_sft_target, parse_recipe
from .study_units import BASE, PREPARE, Unit, base_unit, prepare_unit, run_units, say, unit_provenance, units_of

COORDINATOR_LOCK = "coordinator.lock"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


def record_seconds(record: dict) -> float:
    return float(record.get("train_seconds", 0)) + float(record.get("eval_seconds", 0))


class Progress:
    """What a study prints as it goes: each unit's start and end, and a line of counts with an ETA when they change.
    The ETA is the mean time of the study's finished runs (training and evaluation, from their records) times the
    runs left, over the runs going at once."""

    def __init__(self, root: Path, runs: list[Unit]):
        self.root, self.runs = root, runs
        self.seconds = {unit.name: record_seconds(read_record(unit.product(root))) for unit in runs
                        if unit.done(root)}
        self.last_counts = None

    def finished(self, unit: Unit) -> None:
        if unit.name == PREPARE:
            say("prepared the data and the base model")
            return
        record = read_record(unit.product(self.root))
        metrics = record["metrics"]
        summary = (f"greedy {metrics.get('greedy_accuracy', float('nan')):.3f}, "
                   f"pass@1 {metrics.get('pass@1', float('nan')):.3f}")
        if unit.name == BASE:
            say(f"base model: {summary}")
            return
        self.seconds[unit.name] = record_seconds(record)
        say(f"{len(self.seconds)}/{len(self.runs)} runs done; {unit.name}: {summary} "
            f"(train {record.get('train_seconds', 0):.0f} s, eval {record.get('eval_seconds', 0):.0f} s)")

    def counts(self, running: int, queued: int, waiting: int, failed: int) -> None:
        counts = (len(self.seconds), running, queued, waiting, failed)
        if counts == self.last_counts:
            return
        self.last_counts = counts
        left = len(self.runs) - len(self.seconds) - failed
        eta = ""
        if self.seconds and left > 0:
            mean = sum(self.seconds.values()) / len(self.seconds)
            eta = f", ETA {duration(mean * left / max(1, running))} ({max(1, running)} at a time)"
        parts = [f"{len(self.seconds)}/{len(self.runs)} runs done", f"{running} running", f"{queued} queued"]
        parts += [f"{waiting} held by other workers"] if waiting else []
        parts += [f"{failed} failed"] if failed else []
        say(", ".join(parts) + eta)


class Coordinator:
    """Keeps units going on a launcher: submits what is not done, watches it, starts a unit again when its job ended
    without its product (up to `retries` times), and waits for units that another live worker holds."""

    def __init__(self, launcher, root: Path, retries: int, progress: Progress):
        self.launcher, self.root, self.retries, self.progress = launcher, root, retries, progress
        self.failures: dict[str, str] = {}
        self.blocked: dict[str, Held] = {}

    def run(self, units: list[Unit]) -> None:
        root, launcher = self.root, self.launcher
        todo = [unit for unit in units if not unit.done(root)]
        active = {job.unit.name: job for job in launcher.reattach(todo)}
        if active:
            say(f"watching {len(active)} job(s) submitted before: "
                f"{', '.join(job.describe() for job in active.values())}")
        queue = deque(unit for unit in todo if unit.name not in active)
        waiting: dict[str, Unit] = {}
        attempts, states = Counter(), {}
        try:
            while queue or active or waiting:
                for name, unit in list(waiting.items()):  # held by another worker: done by it, or free again
                    if unit.done(root):
                        del waiting[name]
                        self.progress.finished(unit)
                    elif blocking(unit.directory(root) / "lock") is None:
                        del waiting[name]
                        queue.appendleft(unit)
                while queue and len(active) < launcher.capacity:
                    unit = queue.popleft()
                    if unit.done(root):  # done meanwhile by another worker
                        self.progress.finished(unit)
                        continue
                    held = blocking(unit.directory(root) / "lock")
                    if held is not None:
                        self._held(unit, held, waiting)
                        continue
                    job = launcher.submit(unit)
                    active[unit.name] = job
                    if job.job_id is not None:
                        say(f"{unit.name}: submitted as job {job.job_id} (output {job.output})")
                for name, status in launcher.poll(list(active.values())).items():
                    job = active[name]
                    if status.state != "ended":
                        if states.get(name) != status.state and job.job_id is not None:
                            say(f"{job.describe()}: {status.detail.lower()}")
                        states[name] = status.state
                        continue
                    del active[name]
                    states.pop(name, None)
                    if job.unit.done(root):
                        self.progress.finished(job.unit)
                        continue
                    if isinstance(getattr(job, "error", None), Held):
                        self._held(job.unit, job.error, waiting)
                        continue
                    attempts[name] += 1
                    reason = launcher.failure(job)
                    if attempts[name] <= self.retries:
                        say(f"{name}: {reason}; starting it again (attempt {attempts[name] + 1} of "
                            f"{self.retries + 1})")
                        queue.appendleft(job.unit)
                    else:
                        self.failures[name] = reason
                        say(f"{name}: FAILED: {reason}" + (f" (after {attempts[name]} attempts)"
                                                            if attempts[name] > 1 else ""))
                running = sum(state == "running" for state in states.values()) if launcher.kind == "slurm" \
                    else len(active)
                queued = len(queue) + sum(state == "queued" for state in states.values())
                self.progress.counts(running, queued, len(waiting), len(self.failures))
                if active or waiting:
                    time.sleep(launcher.poll_seconds if active else 5.0)
        except KeyboardInterrupt:
            message = launcher.stop(list(active.values()))
            if message:
                say(f"interrupted: {message}")
            raise

    def _held(self, unit: Unit, held: Held, waiting: dict) -> None:
        if held.checkable:
            if unit.name not in waiting:
                say(f"{unit.name}: waiting for {describe(held.holder)}, which holds it")
            waiting[unit.name] = unit
        else:
            self.blocked[unit.name] = held
            say(f"{unit.name}: skipped: {held.sentence()}")

    def check(self, name: str) -> None:
        """Raise if the unit `name` failed or was skipped (the units after it need it)."""
        if name in self.failures:
            raise RuntimeError(f"{name} failed: {self.failures[name]}")
        if name in self.blocked:
            raise RuntimeError(f"{name} was skipped: {self.blocked[name].sentence()}")


def check_resources(config: LauncherConfig, study: Study) -> None:
    """Resources a run cannot use, refused before anything is submitted: GPUs a run's processes would not fill, or
    more processes than GPUs; several nodes for a run that is not launched through accelerate."""
    if config.type != "slurm":
        return
    processes = study.train.get("num_processes")
    launched = processes is not None and processes > 1 or study.train.get("accelerate_config") is not None
    if config.nodes > 1 and not launched:
        raise UsageError(f"launcher.nodes={config.nodes}: a run spans nodes only through accelerate; set "
                         "num_processes (all GPUs of all nodes) and accelerate_config (e.g. multi_gpu).")
    if config.gpus_per_node is None:
        return
    gpus = config.gpus_per_node * config.nodes
    if processes is None:
        processes = gpus if study.train.get("accelerate_config") is not None else 1  # trl-thr train's default
    if processes < gpus:
        raise UsageError(f"launcher.gpus_per_node={config.gpus_per_node} x nodes={config.nodes} = {gpus} GPUs per "
                         f"job, but a run starts num_processes={processes} process(es), one per GPU: set "
                         f"num_processes {gpus} (with accelerate_config multi_gpu) or gpus_per_node "
                         f"{max(1, processes // config.nodes)}.")
    if processes > gpus:
        raise UsageError(f"num_processes={processes} needs {processes} GPUs, but a job has gpus_per_node="
                         f"{config.gpus_per_node} x nodes={config.nodes} = {gpus}.")


def gpus_per_run(config: LauncherConfig, study: Study) -> int:
    if config.type == "slurm" and config.gpus_per_node is not None:
        return config.gpus_per_node * config.nodes
    return int(study.train.get("num_processes") or 1)


def estimate(study: Study, root: Path, runs: list[Unit], config: LauncherConfig,
             seconds_per_step: float | None) -> str:
    """The GPU-hours of `runs`, from `seconds_per_step` and the runs' `max_steps`, or from a finished run of the
    directory (a pilot): its training seconds per step and its evaluation seconds."""
    pilots = sorted((root / "records").glob("*.json"))
    pilot = read_record(pilots[0]) if pilots else None
    pilot_steps = max((entry.get("step", 0) for entry in pilot["log_history"]), default=0) if pilot else 0
    if seconds_per_step is None and pilot is not None and pilot_steps:
        seconds_per_step = pilot["train_seconds"] / pilot_steps
        source = f"{pilot['train_seconds']:.0f} s for {pilot_steps} steps in {pilots[0].relative_to(root)}"
    elif seconds_per_step is not None:
        source = "--seconds_per_step"
    else:
        return ("No estimate: give --seconds_per_step (the seconds of one training step on the run's GPUs), or run "
                "one run first (a pilot: --seeds with one seed) and ask again.")
    if not runs:
        return "Nothing left to run."
    total, unknown = 0.0, []
    for unit in runs:
        steps = {**study.train, **unit.arm.overrides}.get("max_steps", -1)
        steps = steps if isinstance(steps, int) and steps > 0 else pilot_steps
        if not steps:
            unknown.append(unit.name)
            continue
        total += steps * seconds_per_step + (pilot["eval_seconds"] if pilot else 0.0)
    if unknown:
        return (f"No estimate for {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}: they set no "
                "max_steps (their steps follow from the dataset's size); set max_steps, or run a pilot.")
    gpus = gpus_per_run(config, study)
    evaluation = (f", evaluation {pilot['eval_seconds']:.0f} s per run from {pilots[0].relative_to(root)}"
                  if pilot else "; evaluation not included (no finished run to time it from)")
    return (f"Estimate: {len(runs)} run(s), {hours(total)} h of jobs x {gpus} GPU(s) per run = "
            f"{hours(total * gpus)} GPU-hours (training at {seconds_per_step:.1f} s per step from {source}"
            f"{evaluation}).")


def hours(seconds: float) -> str:
    value = seconds / 3600
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def dry_run(study: Study, root: Path, config: LauncherConfig, seconds_per_step: float | None) -> str:
    """What `trl-thr study` would do now: the units still to do, the command and resources of each, and the
    estimate. Writes nothing."""
    from .study_launchers import SlurmLauncher

    recorded = read_study_file(root) if (root / "study.json").exists() else {}
    units = units_of(study, root)
    todo = [unit for unit in units if not unit.done(root)]
    runs = [unit for unit in todo if unit.is_run]
    lines = [f"Dry run of {root}: {len(runs)} of {len(run_units(study))} runs to do"
             + (f", and {', '.join(u.name for u in todo if not u.is_run)}" if any(not u.is_run for u in todo)
                else "") + "."]
    if config.type == "slurm":
        launcher = SlurmLauncher(config, study, root, recorded.get("study_id", "<id>"))
        live = {job.unit.name: job.job_id for job in launcher.reattach(todo)} if (root / "study.json").exists() \
            and todo else {}
        lines.append("Each unit is one SLURM job, submitted with these options:")
        lines += [f"  #SBATCH {option}" for option in launcher.directives(todo[0] if todo else units[-1])
                  if not option.startswith(("--job-name", "--output"))]
        lines += [f"  {line}" for line in config.setup]
        for unit in todo:
            state = f"   (job {live[unit.name]} is on it: watched, not submitted)" if unit.name in live else ""
            lines.append(f"  {unit.name}: {launcher.command(unit)}{state}")
    else:
        lines.append(f"Each unit runs here, {config.workers} at a time:")
        lines += [f"  {unit.name}" for unit in todo]
    if runs:
        launch = {k: study.train[k] for k in ("num_processes", "accelerate_config") if study.train.get(k)}
        flags = "".join(f" --{key} {value}" for key, value in launch.items())
        lines.append(f"A run: trl-thr train --config runs/<run>/train.yaml{flags}, then trl-thr eval on "
                     f"{len(study.evals)} evaluation set(s).")
    lines.append(estimate(study, root, runs, config, seconds_per_step))
    return "\n".join(lines)


def coordinator_lock(root: Path):
    try:
        return acquire(root / COORDINATOR_LOCK, announce=say)
    except Held as held:
        if held.checkable:
            raise UsageError(f"another `trl-thr study` is coordinating {root}: {describe(held.holder)}. Stop it "
                             "first (Ctrl-C leaves its jobs running), then run this command again.") from None
        raise UsageError(f"another `trl-thr study` may be coordinating {root}: {held.sentence()}.") from None


def run_study(study: Study, root: Path, config: LauncherConfig | None = None) -> dict:
    """Prepare, evaluate the base model, run every (arm, seed) not yet recorded on the launcher `config` says, and
    write the report. Returns the report's results; raises `RuntimeError` naming the runs that failed."""
    from .study_report import write_report

    config = config or LauncherConfig()
    check_prepare_fields(study)
    # The directory is bound to the config as written; the recipe's paths depend on where the directory is.
    design, study = study, with_recipe_outputs(study, root)
    resolved = validate(study, root, recipe_makes_benchmark=study.prepare is not None,
                        trains_here=config.type == "local")
    check_resources(config, study)
    existing = read_study_file(root).get("study_id") if (root / "study.json").exists() else None
    launcher = make_launcher(config, study, root, existing or "new", provenance={})
    if launcher.kind == "slurm":  # before anything is written or submitted
        launcher.check([unit for unit in units_of(study, root) if not unit.done(root)])
    root.mkdir(parents=True, exist_ok=True)
    bind_directory(design, root, resolved)
    launcher.study_id = read_study_file(root)["study_id"]
    runs = run_units(study)
    with coordinator_lock(root) if launcher.kind == "slurm" else nullcontext():
        progress = Progress(root, runs)
        coordinator = Coordinator(launcher, root, config.retries, progress)
        say(f"{len(progress.seconds)}/{len(runs)} runs done; running the rest on {launcher.describe()} in {root}")
        if study.prepare is not None:
            coordinator.run([prepare_unit(study, root)])
            coordinator.check(PREPARE)
            check_sft_target(parse_recipe(study.prepare), root / "base.json")
        provenance = unit_provenance(study)
        check_same_base(root, study.train["model_name_or_path"], provenance["base_sha256"])
        launcher.provenance = provenance
        coordinator.run([base_unit(), *runs])
        results = write_report(root)
    problems = [f"{name} ({reason})" for name, reason in coordinator.failures.items()]
    problems += [f"{name} (skipped: {held.sentence()})" for name, held in coordinator.blocked.items()]
    if problems:
        raise RuntimeError(f"{len(problems)} unit(s) did not finish: {'; '.join(problems)}. The report covers the "
                           "rest; run the same command again to retry them (finished runs are kept).")
    return results


def cancel_study(root: Path, config: LauncherConfig) -> list[str]:
    """`--cancel`: cancel every queued or running SLURM job of the study in `root`; their ids."""
    from .study import load_design
    from .study_launchers import SlurmLauncher

    if config.type != "slurm":
        raise UsageError("--cancel cancels a study's SLURM jobs (--launcher slurm); a local study stops with Ctrl-C.")
    study = with_recipe_outputs(load_design(root), root)
    units = units_of(study, root)
    launcher = SlurmLauncher(config, study, root, read_study_file(root)["study_id"])
    with coordinator_lock(root):
        return launcher.cancel([unit for unit in units if not unit.done(root)])
