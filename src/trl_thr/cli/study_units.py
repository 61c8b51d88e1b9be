"""The work of a `trl-thr study`, in units that one job does from start to end, wherever it runs.

A unit is the preparation recipe (`prepare`), the base model's evaluation (`base`), or one run (`<arm>-s<seed>`):
`trl-thr train`, then `trl-thr eval` on every evaluation set, then its record. `execute` does one unit under its lock
(`study_locks`); it is what a local worker thread calls and what a SLURM job runs (`trl-thr study --output_dir DIR
--run UNIT`), so a record is the same whichever launcher made it. A unit is done when its product exists:

    prepare    base.json (and base/), data/       (the recipe's, `study_recipes`)
    base       base-eval/base.json
    <run>      records/<run>.json

Each product is written atomically once its unit has finished, so a unit killed at any moment is done again from its
start (an interrupted evaluation resumes from its own cache, a finished training from `train_done.json`).
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..files import write_json_atomically, write_text_atomically
from .errors import UsageError
from .study import (
    Arm,
    Study,
    base_fingerprint,
    eval_config,
    metric_key,
    portable,
    read_study_file,
    run_name,
    run_train_config,
    source_provenance,
    with_recipe_outputs,
)
from .study_locks import acquire

PREPARE, BASE = "prepare", "base"


@dataclass(frozen=True)
class Unit:
    """One unit of a study's work: `prepare`, `base`, or the run of `arm` with `seed`. It is done when each of its
    `products` (paths relative to the study directory) exists; the first is its record."""

    name: str
    products: tuple[str, ...]
    arm: Arm | None = None
    seed: int | None = None

    @property
    def is_run(self) -> bool:
        return self.arm is not None

    def directory(self, root: Path) -> Path:
        """Where the unit works: its lock, logs, job scripts and working files."""
        if self.name == PREPARE:
            return root / "prepare"
        if self.name == BASE:
            return root / "base-eval"
        return root / "runs" / self.name

    def product(self, root: Path) -> Path:
        return root / self.products[0]

    def done(self, root: Path) -> bool:
        return all((root / product).exists() for product in self.products)

    def log(self, root: Path) -> Path:
        return self.directory(root) / "log.txt"


def record_path(root: Path, name: str) -> Path:
    return root / "records" / f"{name}.json"


def run_units(study: Study) -> list[Unit]:
    """Every run of the study, whole seeds first, so that a study stopped early has every arm of its first seeds."""
    return [Unit(name, (record_path(Path(), name).as_posix(),), arm, seed)
            for arm, seed in study.run_order() for name in [run_name(arm.name, seed)]]


def base_unit() -> Unit:
    return Unit(BASE, ("base-eval/base.json",))


def prepare_unit(study: Study, root: Path) -> Unit:
    """The preparation recipe's unit: done when its record, its data splits and its base model are all there (a
    base.json copied without base/ is made again, or refused by the recipe with what to copy)."""
    from .study_recipes import parse_recipe, recipe_outputs

    made = recipe_outputs(parse_recipe(study.prepare), root)
    inside = [Path(path) for path in made.values() if Path(path).resolve().is_relative_to(root.resolve())]
    products = ["base.json", *(path.resolve().relative_to(root.resolve()).as_posix() for path in inside),
                "data/sft.jsonl"]
    return Unit(PREPARE, tuple(dict.fromkeys(products)))


def units_of(study: Study, root: Path) -> list[Unit]:
    """Every unit of the study, in the order they are done."""
    return ([prepare_unit(study, root)] if study.prepare is not None else []) + [base_unit(), *run_units(study)]


def find_unit(study: Study, root: Path, name: str) -> Unit:
    """The unit called `name` (`prepare`, `base` or a run), or a `UsageError` listing the names there are."""
    units = {unit.name: unit for unit in units_of(study, root)}
    if name not in units:
        raise UsageError(f"--run {name}: not a unit of this study; its units are {', '.join(units)}.")
    return units[name]


# ---- commands -------------------------------------------------------------------------------------------------------


# Runs in the child before anything else: asks Linux to end it when the thread that started it dies (so that a killed
# study leaves no orphan training a run that the next study process then trains again beside it), checks that this
# parent is still there (it may have died before the request), then becomes the command (exec keeps the request).
ORPHAN_GUARD = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(128 + signal.SIGTERM)
os.execvp(sys.argv[2], sys.argv[2:])
"""


class Children:
    """The commands running for this process's units, so that an interrupted study stops them and waits for them."""

    def __init__(self):
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def add(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.add(process)
        if self.stopping.is_set():
            self._signal(process, signal.SIGINT)

    def discard(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)

    @staticmethod
    def _signal(process: subprocess.Popen, number: int) -> None:
        try:
            process.send_signal(number)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 30.0) -> None:
        """Interrupt every command (SIGINT, as Ctrl-C would), then terminate those still running after `grace` s."""
        self.stopping.set()
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            self._signal(process, signal.SIGINT)
        deadline = time.time() + grace
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait()


class Interrupted(Exception):
    """The study was interrupted while this unit's command ran."""


def across_nodes(arguments: list[str]) -> list[str] | None:
    """`trl-thr train <arguments>` on every node of this SLURM job, when it has several: one `srun` task per node,
    each launching its node's processes through accelerate as machine `$SLURM_NODEID`, machine 0 being the node this
    batch script runs on. None outside such a job."""
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    if nodes < 2:
        return None
    head = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    train = shlex.join([sys.executable, "-m", "trl_thr", *arguments, "--num_machines", str(nodes),
                        "--main_process_ip", head])
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "bash", "-c",
            f'exec {train} --machine_rank "$SLURM_NODEID"']


def run_command(arguments: list[str], log: Path, children: Children | None = None) -> float:
    """Run `trl-thr <arguments>` with its output appended to `log`; seconds taken. A failure raises with the log.
    Training spans the nodes of a SLURM job of several (`across_nodes`)."""
    command = (arguments[0] == "train" and across_nodes(arguments)) or [sys.executable, "-m", "trl_thr", *arguments]
    if sys.platform == "linux":
        command = [sys.executable, "-c", ORPHAN_GUARD, str(os.getpid()), *command]
    started = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write("$ trl-thr " + " ".join(arguments) + "\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        if children is not None:
            children.add(process)
        try:
            returncode = process.wait()
        finally:
            if children is not None:
                children.discard(process)
    if children is not None and children.stopping.is_set():
        raise Interrupted(f"`trl-thr {arguments[0]}` was interrupted")
    if returncode != 0:
        raise RuntimeError(f"`trl-thr {arguments[0]}` exited with {returncode}; see {log}")
    return time.time() - started


# ---- the units ------------------------------------------------------------------------------------------------------


def train_log_history(model_dir: Path) -> list[dict]:
    """The log history of a finished training, from its last checkpoint; the checkpoints are then removed (the final
    model is saved in `model_dir` itself)."""
    import shutil

    from .run_dir import checkpoints_in

    checkpoints = checkpoints_in(model_dir)
    if not checkpoints:
        raise RuntimeError(f"{model_dir}: training finished without a checkpoint to read its log history from.")
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    for checkpoint in checkpoints:
        shutil.rmtree(checkpoint)
    return history


def evaluate(study: Study, model: str, out_dir: Path, name: str, log: Path,
             children: Children | None = None) -> tuple[dict, dict, float]:
    """`(metrics, eval configs, seconds)` of one model on every evaluation set, through `trl-thr eval` (which
    resumes from its cache). Metrics of a named set are prefixed with its name."""
    metrics, configs, seconds = {}, {}, 0.0
    for eval_set in study.evals:
        set_dir = out_dir / eval_set if eval_set else out_dir
        config_path = set_dir / "eval.yaml"
        set_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(config_path, yaml.safe_dump(eval_config(study, eval_set, model, set_dir, name),
                                                          sort_keys=False))
        seconds += run_command(["eval", "--config", str(config_path)], log, children)
        result = json.loads((set_dir / f"{name}.json").read_text())
        metrics.update({metric_key(eval_set, k): v for k, v in result["metrics"].items()})
        configs[eval_set] = result["config"]
    return metrics, (configs[""] if list(configs) == [""] else configs), seconds


def say(message: str) -> None:
    print(f"[study] {message}", flush=True)


def execute_run(study: Study, root: Path, unit: Unit, provenance: dict, children: Children | None = None) -> dict:
    """Train and evaluate one run; its record, written atomically."""
    run_dir = unit.directory(root)
    log = unit.log(root)
    train_done = run_dir / "train_done.json"
    if not train_done.exists():
        config = run_train_config(study, unit.arm, unit.seed, run_dir, retrain=(run_dir / "model").exists())
        config_path = run_dir / "train.yaml"
        write_text_atomically(config_path, yaml.safe_dump(config, sort_keys=False))
        say(f"{unit.name}: training (log {log})")
        seconds = run_command(["train", "--config", str(config_path)], log, children)
        write_json_atomically(train_done, {"seconds": round(seconds, 1),
                                           "log_history": train_log_history(run_dir / "model"), "config": config})
    trained = json.loads(train_done.read_text())
    say(f"{unit.name}: evaluating (log {log})")
    metrics, eval_configs, eval_seconds = evaluate(study, str(run_dir / "model"), run_dir / "eval", unit.name, log,
                                                   children)
    record = {
        "arm": unit.arm.name, "seed": unit.seed, "overrides": unit.arm.overrides,
        **read_study_file(root)["resolved"][unit.arm.name],
        "train_config": trained["config"], "train_seconds": trained["seconds"], "eval_seconds": round(eval_seconds, 1),
        "metrics": metrics, "eval_config": eval_configs, "log_history": trained["log_history"],
        **provenance,
    }
    write_json_atomically(unit.product(root), portable(record, root))
    return record


def execute_base(study: Study, root: Path, provenance: dict, children: Children | None = None) -> dict:
    """Evaluate the base model, every arm's starting point; `base-eval/base.json`."""
    out_dir = root / "base-eval"
    say(f"base model: evaluating (log {out_dir / 'log.txt'})")
    metrics, configs, seconds = evaluate(study, study.train["model_name_or_path"], out_dir / "runs", "base",
                                         out_dir / "log.txt", children)
    result = {"metrics": metrics, "config": configs, "seconds": round(seconds, 1),
              "base_sha256": provenance.get("base_sha256")}
    write_json_atomically(out_dir / "base.json", portable(result, root))
    return result


def execute_prepare(study: Study, root: Path) -> dict:
    """Run the study's preparation recipe: its data splits and base model."""
    from .launch import deepspeed_on_this_machine
    from .study_recipes import parse_recipe
    from .study_recipes import prepare as run_recipe

    deepspeed_on_this_machine()  # the recipe imports transformers

    say("preparing the data and the base model (recipe " f"{study.prepare.get('recipe')})")
    return run_recipe(parse_recipe(study.prepare), root, study.train.get("prompt_template", "qwen-math-boxed"),
                      study.train.get("max_completion_length", 256))


def execute(study: Study, root: Path, unit: Unit, provenance: dict, children: Children | None = None) -> None:
    """Do one unit under its lock (raising `study_locks.Held` if a live worker has it), unless it is done already.

    `study` is the design with the recipe's outputs filled in (`with_recipe_outputs`); `provenance` is what every
    record carries about the code and the base weights (`unit_provenance`).
    """
    with acquire(unit.directory(root) / "lock", announce=say):
        if unit.done(root):
            return
        if unit.name == PREPARE:
            execute_prepare(study, root)
        elif unit.name == BASE:
            execute_base(study, root, provenance, children)
        else:
            execute_run(study, root, unit, provenance, children)


def unit_provenance(study: Study) -> dict:
    """What every record carries about the code that made it and the weights its runs start from."""
    return {**source_provenance(), "base_sha256": base_fingerprint(study.train["model_name_or_path"])}


def execute_in_job(root: Path, name: str) -> None:
    """`trl-thr study --output_dir DIR --run NAME`: one unit of the study in DIR, as its design in `study.json` says
    (what a SLURM job runs)."""
    from .study import check_same_base, load_design

    design = load_design(root)
    study = with_recipe_outputs(design, root)
    unit = find_unit(study, root, name)
    if unit.name == PREPARE:
        execute(study, root, unit, {})
        return
    provenance = unit_provenance(study)
    check_same_base(root, study.train["model_name_or_path"], provenance["base_sha256"])
    execute(study, root, unit, provenance)
