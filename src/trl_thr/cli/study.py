"""`trl-thr study`: train every (arm, seed) with `trl-thr train`, evaluate it with `trl-thr eval`, and compare.

A study is a directory (`output_dir`):

    study.json              the design (train config, arms, evaluation, preparation) and the code that ran it
    data/ base/ base.json   what a preparation recipe made (`study_recipes`), if the study has one
    base-eval/              the evaluation of the base model, every arm's starting point
    runs/<run>/             one run's working files: train.yaml, model/, eval/ (with its generation cache), log.txt,
                            lock while a worker holds it
    records/<run>.json      one finished run: its settings, training log history and evaluation metrics, and the
                            fingerprint of the base model's weights it started from (`base_sha256`)
    results.json results.md *.png    the report (`study_report`)

A run is named `<arm>-s<seed>` (`:` written `_p`). Its record is written atomically once the run has trained and
been evaluated, so a study killed at any moment resumes by skipping the runs that have a record; an interrupted
evaluation resumes from its own cache. Workers (threads of one `trl-thr study`, or several `trl-thr study`
processes on one or more machines sharing the directory) claim a run with its lock file; a worker refreshes its lock
while it runs, and a lock whose process is gone (same machine) or that has not been refreshed for `lock_timeout`
seconds (any machine) is taken over.

A recipe's base model is rebuilt bit for bit on the same machine, not on another CPU or library build (float sums
differ): a study resumed elsewhere without its `base/` would mix runs from two bases, so it is refused.
"""

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..files import write_json_atomically, write_text_atomically
from .errors import UsageError

STUDY_FILE = "study.json"
# Fields every run's train config gets from the study (its own output directory, its seed, and one checkpoint at the
# end whose trainer_state.json holds the log history); a value the train config gives for them is replaced.
STUDY_SET_TRAIN_FIELDS = ("output_dir", "seed", "data_seed", "save_strategy", "save_steps", "save_only_model",
                          "overwrite_output_dir", "resume_from_checkpoint")
STUDY_SET_EVAL_FIELDS = ("model_name_or_path", "adapter_name_or_path", "output_dir", "run_name", "compare")
ARM_LABEL = re.compile(r"^[A-Za-z0-9_.+:-]+$")
HEARTBEAT_SECONDS = 30.0


# ---- arms -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One arm: a label and the train fields it sets on top of the study's train config."""

    name: str
    overrides: dict = field(default_factory=dict)


def named_arm_overrides(name: str, label_only: bool = False) -> dict | None:
    """The fields a named arm sets: `grpo` is `thr_strategy: none`; a `thr_strategy` sets it; `strategy:p` also
    sets `thr_p` (strategies that read p only). `None` for a name that is none of these; with `label_only` (the arm
    gives its fields), also for `strategy:<not a number>`, e.g. `amplify:0.5-noclip`."""
    from ..thr import STRATEGIES, STRATEGIES_USING_P

    strategy, colon, written_p = name.partition(":")
    strategy = "none" if strategy == "grpo" else strategy
    if strategy not in STRATEGIES:
        return None
    if not colon:
        return {"thr_strategy": strategy}
    if label_only:
        try:
            float(written_p)
        except ValueError:
            return None
    if strategy not in STRATEGIES_USING_P:
        raise UsageError(f"arm {name!r}: thr_strategy {strategy!r} does not use p; write it without ':p' (strategies "
                         f"with p: {', '.join(STRATEGIES_USING_P)}).")
    try:
        p = float(written_p)
    except ValueError:
        raise UsageError(f"arm {name!r}: {written_p!r} after ':' is not a number (e.g. amplify:-0.25).") from None
    return {"thr_strategy": strategy, "thr_p": p}


def parse_override_list(arm: str, text: str) -> dict:
    """`key:value,key:value` (values read as YAML scalars: 0.2, none, true) as a dict."""
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, colon, value = item.partition(":")
        if not colon or not key:
            raise UsageError(f"arm {arm!r}: {item!r} is not key:value (e.g. entropy20=thr_strategy:none,"
                             "top_entropy_quantile:0.2).")
        overrides[key.strip()] = yaml.safe_load(value.strip())
    return overrides


def parse_arm(spec, overrides: dict | None = None) -> Arm:
    """An arm from its command-line spelling or a YAML `label: {field: value}` entry.

    `grpo`, a `thr_strategy` (`positive-amplify`, ...), `strategy:p` (`amplify:-0.25`), or `label=key:value,...`
    (`entropy20=thr_strategy:none,top_entropy_quantile:0.2`). A label that is itself a named arm starts from that
    arm's fields; any other label starts from the train config alone.
    """
    label, equals, written = str(spec).partition("=")
    if not ARM_LABEL.match(label):
        raise UsageError(f"arm {spec!r}: a label may hold letters, digits and _ . + : - only.")
    given = dict(overrides or {})
    if equals:
        given.update(parse_override_list(label, written))
    implied = named_arm_overrides(label, label_only=bool(given))
    if implied is None and not given:
        raise UsageError(f"unknown arm {label!r}: not 'grpo', a thr_strategy or strategy:p; give a labelled arm its "
                         "fields, e.g. entropy20=thr_strategy:none,top_entropy_quantile:0.2.")
    return Arm(label, {**(implied or {}), **given})


def parse_arms(arms) -> list[Arm]:
    """Arms from a list of spellings, or a YAML mapping label -> fields (or null)."""
    if isinstance(arms, dict):
        parsed = [parse_arm(label, fields_ or {}) for label, fields_ in arms.items()]
    elif isinstance(arms, list):
        parsed = [parse_arm(spec) for spec in arms]
    else:
        raise UsageError("arms must be a list (grpo, positive-amplify, amplify:-0.5, label=key:value,...) or a "
                         "mapping label: {field: value}.")
    names = [arm.name for arm in parsed]
    if len(set(names)) != len(names):
        raise UsageError(f"arms: {sorted({n for n in names if names.count(n) > 1})} given twice.")
    if not parsed:
        raise UsageError("arms: give at least one arm.")
    return parsed


def run_name(arm: str, seed: int) -> str:
    """The directory and record name of one run, e.g. `amplify_p-0.25-s3` (no ':' in file names)."""
    return f"{arm.replace(':', '_p')}-s{seed}"


# ---- the design -----------------------------------------------------------------------------------------------------


@dataclass
class Study:
    """What a study trains and evaluates. `design()` is what a study directory is bound to; seeds may grow."""

    train: dict
    arms: list[Arm]
    seeds: list[int]
    # Evaluation sets by name, each `trl-thr eval`'s fields; one set may be named "" (its metrics unprefixed), the
    # metrics of a named set are `<name>/<metric>`.
    evals: dict[str, dict]
    prepare: dict | None = None
    reference_arm: str | None = None
    # Paired differences the report gives besides each arm minus the reference arm: ("a", "b") is a - b.
    contrasts: list[tuple[str, str]] = field(default_factory=list)
    lock_timeout: float = 600.0

    def design(self) -> dict:
        return json.loads(json.dumps({
            "train": self.train, "arms": {arm.name: arm.overrides for arm in self.arms}, "evals": self.evals,
            "prepare": self.prepare, "reference_arm": self.reference_arm,
            "contrasts": [list(contrast) for contrast in self.contrasts],
        }, default=str))

    def run_order(self) -> list[tuple[Arm, int]]:
        """Whole seeds first, so that a study stopped early has every arm of its first seeds."""
        return [(arm, seed) for seed in self.seeds for arm in self.arms]


def parse_contrasts(contrasts, arms: list[Arm]) -> list[tuple[str, str]]:
    """`["a - b", ...]` as `[(a, b), ...]`, each naming two arms of the study."""
    if not isinstance(contrasts, list):
        raise UsageError('contrasts must be a list of "arm - arm" strings, e.g. ["positive-amplify - negative-amplify"].')
    names, parsed = [arm.name for arm in arms], []
    for contrast in contrasts:
        first, minus, second = str(contrast).partition(" - ")
        if not minus:
            raise UsageError(f"contrast {contrast!r}: write it as 'arm - arm' (spaces around '-') with two of the "
                             f"arms {names}.")
        unknown = [arm for arm in (first.strip(), second.strip()) if arm not in names]
        if unknown:
            raise UsageError(f"contrast {contrast!r}: {', '.join(map(repr, unknown))} is not an arm of this study "
                             f"{names}; add the arm or remove the contrast.")
        parsed.append((first.strip(), second.strip()))
    return parsed


def check_seeds(seeds) -> list[int]:
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UsageError(f"seeds must be a list of integers, got {seeds!r}.")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds: {sorted({s for s in seeds if seeds.count(s) > 1})} given twice.")
    if len(seeds) < 2:
        raise UsageError(f"seeds: {len(seeds)} seed gives no interval; a study needs at least 2 (16 to see a few "
                         "points of accuracy).")
    return seeds


def design_differences(old: dict, new: dict) -> list[str]:
    """What differs between a directory's design and this one: changed sections or fields, and arms whose fields
    changed. Arms only in `new` are additions, not differences."""
    differences = []
    for section in ("train", "evals", "prepare"):
        before, after = old.get(section), new.get(section)
        if isinstance(before, dict) and isinstance(after, dict):
            for key in sorted(set(before) | set(after)):
                if before.get(key) != after.get(key):
                    differences.append(f"{section}.{key}: {before.get(key)!r} -> {after.get(key)!r}")
        elif before != after:
            differences.append(f"{section}: {before!r} -> {after!r}")
    for arm, fields_ in old.get("arms", {}).items():
        if arm in new["arms"] and new["arms"][arm] != fields_:
            differences.append(f"arm {arm}: {fields_!r} -> {new['arms'][arm]!r}")
    if old.get("reference_arm") != new.get("reference_arm"):  # contrasts may change: they are analysis only
        differences.append(f"reference_arm: {old.get('reference_arm')!r} -> {new.get('reference_arm')!r}")
    return differences


def bind_directory(study: Study, root: Path) -> None:
    """Write `study.json` in a new study directory, or check that an existing one was made with this design."""
    path = root / STUDY_FILE
    design = study.design()
    if path.exists():
        recorded = json.loads(path.read_text())
        if "design" not in recorded:
            raise UsageError(f"{root} holds a study written by an earlier tool (no design in {STUDY_FILE}); use "
                             "another output_dir, or `trl-thr study --report` to summarise it.")
        differences = design_differences(recorded["design"], design)
        if differences:
            raise UsageError(f"{root} is a study made with a different config ({'; '.join(differences)}); use "
                             "another output_dir, or the config it was made with.")
        arms = {**recorded["design"]["arms"], **design["arms"]}
        seeds = list(dict.fromkeys(recorded.get("seeds", []) + study.seeds))
        if (arms == recorded["design"]["arms"] and seeds == recorded.get("seeds")
                and design["contrasts"] == recorded["design"].get("contrasts", [])):
            return
        design["arms"] = arms  # contrasts are analysis: the config's replace the recorded ones
    else:
        seeds = study.seeds
    write_json_atomically(path, {"design": design, "seeds": seeds, **source_provenance()})


def source_provenance() -> dict:
    """Which code runs the study: the package's version, git commit (if a checkout) and a hash of its sources."""
    import hashlib

    import trl_thr

    package = Path(trl_thr.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")) + sorted(package.rglob("*.yaml")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    commit = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", "."], capture_output=True,
                            text=True)
    return {"trl_thr_version": trl_thr.__version__, "source_commit": commit.stdout.strip() or None,
            "source_uncommitted_changes": bool(status.stdout.strip()) if commit.returncode == 0 else None,
            "source_sha256": digest.hexdigest()[:16]}


def base_fingerprint(model: str) -> str | None:
    """A hash of a local or builtin model's weight files (`*.safetensors`, `*.bin`), or None for a hub model id."""
    import hashlib

    from .models import BUILTIN_PREFIX, resolve_model

    directory = Path(resolve_model(model) if model.startswith(BUILTIN_PREFIX) else model)
    weights = sorted(p for p in directory.glob("*") if p.suffix in (".safetensors", ".bin"))
    if not weights:
        return None
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def check_same_base(root: Path, model: str, fingerprint: str | None) -> None:
    """Refuse to add runs to a directory whose finished runs (or base evaluation) started from other weights."""
    if fingerprint is None:
        return
    made = sorted((root / "records").glob("*.json")) + [root / "base-eval" / "base.json"]
    for path in made:
        if path.exists() and (other := json.loads(path.read_text()).get("base_sha256")) not in (None, fingerprint):
            raise UsageError(
                f"{path.relative_to(root)} started from a base model with weights {other}, but {model} now has "
                f"{fingerprint}: a recipe's fine-tuning is reproducible on one machine, not across CPUs or library "
                "builds. Bring the study's base/ directory along with its records, or run the missing seeds in "
                "another output_dir (--seeds).")


# ---- one run's configs ----------------------------------------------------------------------------------------------


def run_train_config(study: Study, arm: Arm, seed: int, run_dir: Path, retrain: bool = False) -> dict:
    """The train config of one run: the study's, the arm's fields, and the fields the study sets."""
    config = {**study.train, **arm.overrides, "output_dir": str(run_dir / "model"), "seed": seed, "data_seed": seed}
    max_steps = config.get("max_steps", -1)
    if isinstance(max_steps, int) and max_steps > 0:
        config.update(save_strategy="steps", save_steps=max_steps)
    else:
        config.update(save_strategy="epoch")
    config.update(save_only_model=True, overwrite_output_dir=retrain)
    config.pop("resume_from_checkpoint", None)
    return config


def eval_config(study: Study, eval_set: str, model: str, output_dir: Path, name: str) -> dict:
    """`trl-thr eval`'s config for one model on one evaluation set: the set's fields; the prompt template and
    completion length of training where the set leaves them unset."""
    config = {"prompt_template": study.train.get("prompt_template"),
              "max_new_tokens": study.train.get("max_completion_length"), **study.evals[eval_set],
              "model_name_or_path": model, "output_dir": str(output_dir), "run_name": name}
    return {k: v for k, v in config.items() if v is not None}


def metric_key(eval_set: str, metric: str) -> str:
    return f"{eval_set}/{metric}" if eval_set else metric


def validate(study: Study, root: Path, recipe_makes_benchmark: bool = False) -> dict[str, dict]:
    """Parse every arm's train config and the eval config with the commands' own parsers, before anything trains:
    one line naming the arm and the field for a bad key or value. Returns each arm's `thr_strategy`, signed `thr_p`
    and `max_grad_norm` as training will use them."""
    import tempfile

    from ..thr import STRATEGIES_USING_P, signed_p
    from .commands import eval as eval_command
    from .commands import train as train_command

    if study.reference_arm is not None and study.reference_arm not in [arm.name for arm in study.arms]:
        raise UsageError(f"reference_arm={study.reference_arm!r} is not one of the arms "
                         f"{[arm.name for arm in study.arms]}.")
    if not study.evals or not all(fields_.get("benchmark") for fields_ in study.evals.values()):
        raise UsageError("no evaluation set: set eval.benchmark in the study config (or --benchmark): a preset "
                         "(math-500, aime24, gsm8k-test, ...), 'arithmetic', or a local JSONL file.")
    resolved = {}
    with tempfile.TemporaryDirectory() as scratch:
        for arm in study.arms:
            config = run_train_config(study, arm, study.seeds[0], root / "runs" / run_name(arm.name, study.seeds[0]))
            path = Path(scratch) / f"{run_name(arm.name, 0)}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            try:
                (_, training, model, *_), _ = train_command.parse_args(["--config", str(path)])
            except UsageError as error:
                message = str(error).replace(str(path), "its train config")
                raise UsageError(f"arm {arm.name}: {message}") from None
            if "thr_p" in arm.overrides and training.thr_strategy not in STRATEGIES_USING_P:
                raise UsageError(f"arm {arm.name}: thr_p={arm.overrides['thr_p']} has no effect with thr_strategy="
                                 f"{training.thr_strategy!r}; use one of {', '.join(STRATEGIES_USING_P)}.")
            if not model.model_name_or_path:
                raise UsageError("train.model_name_or_path is not set (or use a prepare recipe).")
            resolved[arm.name] = {"thr_strategy": training.thr_strategy,
                                  "thr_p": signed_p(training.thr_strategy, training.thr_p),
                                  "max_grad_norm": training.max_grad_norm}
        for eval_set in study.evals:
            where = f"evals.{eval_set}" if eval_set else "eval"
            path = Path(scratch) / "eval.yaml"
            path.write_text(yaml.safe_dump(eval_config(study, eval_set, "model", root / "eval", "check"),
                                           sort_keys=False))
            try:
                args = eval_command.parse_args(["--config", str(path)])
                from .evaluation import check_ks

                check_ks(args.k_values, args.n_samples)
            except (UsageError, ValueError) as error:
                raise UsageError(f"{where}: {str(error).replace(str(path), 'its config')}") from None
            benchmark = args.benchmark
            if (not recipe_makes_benchmark and str(benchmark).endswith((".json", ".jsonl", ".parquet", ".csv"))
                    and not Path(benchmark).is_file()):
                raise UsageError(f"{where}.benchmark={benchmark}: no such file.")
    return resolved


# ---- claiming runs --------------------------------------------------------------------------------------------------


class RunLock:
    """A run's lock file, held while one worker trains and evaluates it; refreshed every `HEARTBEAT_SECONDS`."""

    def __init__(self, path: Path, owner: dict):
        self.path, self.owner = path, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        if read_lock(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def lock_is_stale(path: Path, holder: dict | None, timeout: float) -> bool:
    """A lock is stale when its process is gone (same machine) or it has not been refreshed for `timeout` s."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if holder is None:  # unreadable: a writer cut short, or one mid-write; only age tells
        return age > timeout
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, KeyError):
            pass
    return age > timeout


def claim(run_dir: Path, timeout: float) -> RunLock | None:
    """Take the run's lock, or `None` if a live worker holds it. A stale lock is moved aside (atomically: of two
    workers that both find it stale, one moves it) and the lock is then taken as new."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "lock"
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "since": time.time()}
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = read_lock(path)
            if not lock_is_stale(path, holder, timeout):
                return None
            aside = run_dir / f"lock.stale.{owner['token']}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another worker moved it first
            if read_lock(aside) != holder:  # a fresh lock was taken between the read and the move: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                return None
            aside.unlink(missing_ok=True)
            print(f"[study] {run_dir.name}: took over the stale lock of {holder}", flush=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(owner))
        return RunLock(path, owner)
    return None


# ---- running --------------------------------------------------------------------------------------------------------


# A command the study starts ends when the study process dies (see `die_with_parent`), so that a killed study leaves
# no orphan training into a run that another worker will take over.
PARENT_VARIABLE = "TRL_THR_STUDY_PID"


def die_with_parent() -> None:
    """In a `trl-thr` process a study started (`PARENT_VARIABLE` names its parent): ask Linux to end it when that
    parent dies. Done by the child itself: a `preexec_fn` is unsafe in the study's multithreaded process."""
    parent = os.environ.get(PARENT_VARIABLE)
    if parent is None or sys.platform != "linux" or os.getppid() != int(parent):
        return  # not the study's child (e.g. a process that `accelerate launch` started in turn)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_command(arguments: list[str], log: Path) -> float:
    """Run `trl-thr <arguments>` with its output appended to `log`; seconds taken. A failure raises with the log."""
    command = [sys.executable, "-m", "trl_thr", *arguments]
    started = time.time()
    with log.open("a") as handle:
        handle.write("$ trl-thr " + " ".join(arguments) + "\n")
        handle.flush()
        process = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                 env={**os.environ, PARENT_VARIABLE: str(os.getpid())})
    if process.returncode != 0:
        raise RuntimeError(f"`trl-thr {arguments[0]}` exited with {process.returncode}; see {log}")
    return time.time() - started


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


def evaluate(study: Study, model: str, out_dir: Path, name: str, log: Path) -> tuple[dict, dict, float]:
    """`(metrics, eval configs, seconds)` of one model on every evaluation set, through `trl-thr eval` (which
    resumes from its cache). Metrics of a named set are prefixed with its name."""
    metrics, configs, seconds = {}, {}, 0.0
    for eval_set in study.evals:
        set_dir = out_dir / eval_set if eval_set else out_dir
        config_path = set_dir / "eval.yaml"
        set_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(config_path, yaml.safe_dump(eval_config(study, eval_set, model, set_dir, name),
                                                          sort_keys=False))
        seconds += run_command(["eval", "--config", str(config_path)], log)
        result = json.loads((set_dir / f"{name}.json").read_text())
        metrics.update({metric_key(eval_set, k): v for k, v in result["metrics"].items()})
        configs[eval_set] = result["config"]
    return metrics, (configs[""] if list(configs) == [""] else configs), seconds


def record_path(root: Path, name: str) -> Path:
    return root / "records" / f"{name}.json"


def run_one(study: Study, root: Path, arm: Arm, seed: int, resolved: dict, provenance: dict) -> dict:
    """Train and evaluate one (arm, seed) whose lock this worker holds; its record, written atomically."""
    name = run_name(arm.name, seed)
    run_dir = root / "runs" / name
    log = run_dir / "log.txt"
    train_done = run_dir / "train_done.json"
    if not train_done.exists():
        config = run_train_config(study, arm, seed, run_dir, retrain=(run_dir / "model").exists())
        config_path = run_dir / "train.yaml"
        write_text_atomically(config_path, yaml.safe_dump(config, sort_keys=False))
        seconds = run_command(["train", "--config", str(config_path)], log)
        write_json_atomically(train_done, {"seconds": round(seconds, 1),
                                           "log_history": train_log_history(run_dir / "model"), "config": config})
    trained = json.loads(train_done.read_text())
    metrics, eval_configs, eval_seconds = evaluate(study, str(run_dir / "model"), run_dir / "eval", name, log)
    record = {
        "arm": arm.name, "seed": seed, "overrides": arm.overrides, **resolved[arm.name],
        "train_config": trained["config"], "train_seconds": trained["seconds"], "eval_seconds": round(eval_seconds, 1),
        "metrics": metrics, "eval_config": eval_configs, "log_history": trained["log_history"],
        **provenance,
    }
    write_json_atomically(record_path(root, name), record)
    return record


class Progress:
    """Runs done of the whole study (any worker's), and an ETA from this process's own run times."""

    def __init__(self, root: Path, study: Study, workers: int):
        self.root, self.study, self.workers = root, study, workers
        self.total = len(study.run_order())
        self.durations: list[float] = []
        self.failed: list[str] = []
        self.lock = threading.Lock()

    def done(self) -> int:
        return sum(record_path(self.root, run_name(a.name, s)).exists() for a, s in self.study.run_order())

    def report(self, name: str, seconds: float, record: dict | None, error: Exception | None = None) -> None:
        with self.lock:
            done = self.done()
            if record is not None:
                self.durations.append(seconds)
                metrics = record["metrics"]
                outcome = (f"greedy {metrics.get('greedy_accuracy', float('nan')):.3f}, "
                           f"pass@1 {metrics.get('pass@1', float('nan')):.3f}")
            else:
                self.failed.append(name)
                outcome = f"FAILED ({error})"
            remaining = self.total - done
            eta = ""
            if self.durations and remaining:
                minutes = sum(self.durations) / len(self.durations) * remaining / self.workers / 60
                eta = f", ETA {minutes:.0f} min"
            print(f"[study] {done}/{self.total} runs done{eta}; {name}: {outcome} ({seconds:.0f} s)", flush=True)


def worker(study: Study, root: Path, resolved: dict, provenance: dict, progress: Progress) -> None:
    for arm, seed in study.run_order():
        name = run_name(arm.name, seed)
        if record_path(root, name).exists():
            continue
        lock = claim(root / "runs" / name, study.lock_timeout)
        if lock is None:
            continue
        started = time.time()
        try:
            if record_path(root, name).exists():  # finished by another worker between the check and the claim
                continue
            record = run_one(study, root, arm, seed, resolved, provenance)
            progress.report(name, time.time() - started, record)
        except RuntimeError as error:
            progress.report(name, time.time() - started, None, error)
        finally:
            lock.release()


def evaluate_base(study: Study, root: Path, fingerprint: str | None) -> dict:
    """The base model's evaluation (once per study), every arm's starting point; `fingerprint` is its weights'."""
    out_dir = root / "base-eval"
    result = out_dir / "base.json"
    if not result.exists():
        lock = claim(out_dir, study.lock_timeout)
        while lock is None:  # another worker evaluates it: wait for its result
            time.sleep(5)
            if result.exists():
                return json.loads(result.read_text())["metrics"]
            lock = claim(out_dir, study.lock_timeout)
        try:
            if not result.exists():
                metrics, configs, seconds = evaluate(study, study.train["model_name_or_path"], out_dir / "runs",
                                                     "base", out_dir / "log.txt")
                write_json_atomically(result, {"metrics": metrics, "config": configs, "seconds": round(seconds, 1),
                                               "base_sha256": fingerprint})
        finally:
            lock.release()
    return json.loads(result.read_text())["metrics"]


def prepare(study: Study, root: Path) -> None:
    """Run the study's preparation recipe (once; other workers wait for it)."""
    from .study_recipes import parse_recipe
    from .study_recipes import prepare as run_recipe

    if study.prepare is None:
        return
    lock = claim(root / "prepare", study.lock_timeout)
    while lock is None:
        time.sleep(5)
        lock = claim(root / "prepare", study.lock_timeout)
    try:
        run_recipe(parse_recipe(study.prepare), root, study.train.get("prompt_template", "qwen-math-boxed"),
                   study.train.get("max_completion_length", 256))
    finally:
        lock.release()


def check_prepare_fields(study: Study) -> None:
    """A recipe provides the base model and the data: the config must not name them too."""
    if study.prepare is None:
        return
    from .study_recipes import parse_recipe

    parse_recipe(study.prepare)
    given = [f"train.{k}" for k in ("model_name_or_path", "dataset_name") if study.train.get(k) is not None]
    given += ["eval.benchmark"] if any(f.get("benchmark") is not None for f in study.evals.values()) else []
    if given:
        raise UsageError(f"{', '.join(given)}: set by the prepare recipe ({study.prepare.get('recipe')}); remove "
                         "them from the config.")


def with_recipe_outputs(study: Study, root: Path) -> Study:
    """The study with training and evaluation pointed at what its recipe makes under `root` (itself if none)."""
    from .study_recipes import parse_recipe, recipe_outputs

    if study.prepare is None:
        return study
    made = recipe_outputs(parse_recipe(study.prepare), root)
    return Study(train={**study.train, "model_name_or_path": made["model"], "dataset_name": made["train"]},
                 arms=study.arms, seeds=study.seeds,
                 evals={name: {**fields_, "benchmark": made["test"]} for name, fields_ in study.evals.items()},
                 prepare=study.prepare, reference_arm=study.reference_arm, contrasts=study.contrasts,
                 lock_timeout=study.lock_timeout)


def run_study(study: Study, root: Path, workers: int = 1) -> dict:
    """Prepare, evaluate the base model, run every (arm, seed) not yet recorded with `workers` threads, and write the
    report. Returns the report's results; raises `RuntimeError` naming the runs that failed."""
    from .study_report import write_report

    check_prepare_fields(study)
    # The directory is bound to the config as written; the recipe's paths depend on where the directory is.
    design, study = study, with_recipe_outputs(study, root)
    resolved = validate(study, root, recipe_makes_benchmark=study.prepare is not None)
    root.mkdir(parents=True, exist_ok=True)
    bind_directory(design, root)
    prepare(study, root)
    model = study.train["model_name_or_path"]
    fingerprint = base_fingerprint(model)
    check_same_base(root, model, fingerprint)
    provenance = {**source_provenance(), "base_sha256": fingerprint}
    base = evaluate_base(study, root, fingerprint)
    print(f"[study] base model: greedy {base.get('greedy_accuracy')}, pass@1 {base.get('pass@1')}", flush=True)
    progress = Progress(root, study, workers)
    print(f"[study] {progress.done()}/{progress.total} runs done; {workers} worker(s) in {root}", flush=True)
    threads = [threading.Thread(target=worker, args=(study, root, resolved, provenance, progress))
               for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = write_report(root)
    if progress.failed:
        raise RuntimeError(f"{len(progress.failed)} run(s) failed: {', '.join(progress.failed)}; each run's log.txt "
                           "says why. Rerun the same command to retry them (finished runs are kept).")
    return results
