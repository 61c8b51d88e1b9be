"""`trl-thr study`: what a study is. Its arms, its seeds, its evaluation sets, and the directory bound to them.

A study is a directory (`output_dir`):

    study.json              the design (train config, arms, evaluation, preparation), the study's id and the code
                            that ran it
    data/ base/ base.json   what a preparation recipe made (`study_recipes`), if the study has one
    base-eval/              the evaluation of the base model, every arm's starting point
    runs/<run>/             one run's working files: train.yaml, model/, eval/ (with its generation cache), log.txt,
                            its lock while a worker holds it, and under SLURM its job scripts, outputs and attempts
    records/<run>.json      one finished run: its settings, training log history and evaluation metrics, and the
                            fingerprint of the base model's weights it started from (`base_sha256`)
    results.json results.md *.png    the report (`study_report`)

A run is named `<arm>-s<seed>` (`:` written `_p`). Paths in records are relative to the study directory, so that a
study can be moved or committed. The work itself (`study_units`), who holds it (`study_locks`) and where it runs
(`study_launchers`, `study_coordinator`) live beside this module.

A recipe's base model is rebuilt bit for bit on the same machine, not on another CPU or library build (float sums
differ): a study resumed elsewhere without its `base/` would mix runs from two bases, so it is refused.
"""

import json
import re
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..files import write_json_atomically
from .errors import UsageError

STUDY_FILE = "study.json"
# Fields every run's train config gets from the study (its own output directory, its seed, and one checkpoint at the
# end whose trainer_state.json holds the log history): a value the train config gives for them is replaced, and an arm
# that sets one is refused (its runs would not differ by it).
STUDY_SET_TRAIN_FIELDS = ("output_dir", "seed", "data_seed", "save_strategy", "save_steps", "save_only_model",
                          "overwrite_output_dir", "resume_from_checkpoint")
STUDY_SET_EVAL_FIELDS = ("model_name_or_path", "adapter_name_or_path", "output_dir", "run_name", "compare")
ARM_LABEL = re.compile(r"^[A-Za-z0-9_.+:-]+$")


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
        overrides[key.strip()] = read_scalar(value.strip())
    return overrides


# YAML 1.1, which PyYAML reads, takes a number in scientific notation without a dot (`1e-3`) for a string; TRL's
# parser then reads that string as the float it is. Such a value is read as that float here too.
SCIENTIFIC_WITHOUT_DOT = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")


def read_scalar(text: str):
    """A value written on the command line, as a YAML scalar (0.2, none, true, [1, 2]) and `1e-3` as a float."""
    return as_training_reads(yaml.safe_load(text))


def as_training_reads(value):
    """`value` (a config's mapping, list or scalar) with every `1e-3`-like string read as the float it is."""
    if isinstance(value, dict):
        return {key: as_training_reads(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_training_reads(item) for item in value]
    if isinstance(value, str) and SCIENTIFIC_WITHOUT_DOT.match(value.strip()):
        return float(value)
    return value


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
    owned = [key for key in given if key in STUDY_SET_TRAIN_FIELDS]
    if owned:
        raise UsageError(f"arm {label!r} sets {', '.join(owned)}, which the study sets for every run (each run's "
                         "output directory, seed and checkpoint); remove it from the arm (seeds: the seeds section).")
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

    @classmethod
    def from_design(cls, design: dict, seeds: list[int]) -> "Study":
        """The study a directory's `study.json` describes (its `design` and `seeds`)."""
        return cls(train=design["train"], arms=[Arm(name, overrides) for name, overrides in design["arms"].items()],
                   seeds=seeds, evals=design["evals"], prepare=design.get("prepare"),
                   reference_arm=design.get("reference_arm"),
                   contrasts=[tuple(contrast) for contrast in design.get("contrasts", [])])

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
    """What differs between a directory's design and this one, field by field (`train.learning_rate: 0.001 -> 0.01`),
    comparing values as training reads them. Arms only in `new` are additions, not differences; contrasts are
    analysis only and may change."""
    def compare(before, after, where: str) -> list[str]:
        before, after = as_training_reads(before), as_training_reads(after)
        if isinstance(before, dict) and isinstance(after, dict):
            # The unnamed evaluation set is the config's `eval` section.
            name = {"": lambda key: "eval" if where == "evals" else where}.get
            return [difference for key in sorted(set(before) | set(after), key=str)
                    for difference in compare(before.get(key), after.get(key),
                                              (name(key) or (lambda key: f"{where}.{key}"))(key))]
        return [] if before == after else [f"{where}: {before!r} -> {after!r}"]

    differences = []
    for section in ("train", "evals", "prepare", "reference_arm"):
        differences += compare(old.get(section), new.get(section), section)
    for arm, fields_ in old.get("arms", {}).items():
        if arm in new["arms"]:
            differences += compare(fields_, new["arms"][arm], f"arm {arm}")
    return differences


def bind_directory(study: Study, root: Path, resolved: dict[str, dict]) -> None:
    """Write `study.json` in a new study directory, or check that an existing one was made with this design.
    `resolved`: each arm's settings as training reads them (`resolve_arm`), kept for the runs' records."""
    path = root / STUDY_FILE
    design = study.design()
    if path.exists():
        recorded = read_study_file(root)
        if "design" not in recorded:
            raise UsageError(f"{root} holds a study written by an earlier tool (no design in {STUDY_FILE}); use "
                             "another output_dir, or `trl-thr study --report` to summarise it.")
        differences = design_differences(recorded["design"], design)
        if differences:
            raise UsageError(f"{root} is a study made with a different config ({'; '.join(differences)}); use "
                             "another output_dir, or the config it was made with.")
        arms = {**recorded["design"]["arms"], **design["arms"]}
        seeds = list(dict.fromkeys(recorded.get("seeds", []) + study.seeds))
        resolved = {**recorded.get("resolved", {}), **resolved}
        study_id = recorded.get("study_id") or uuid.uuid4().hex[:8]
        if (arms == recorded["design"]["arms"] and seeds == recorded.get("seeds")
                and design["contrasts"] == recorded["design"].get("contrasts", [])
                and recorded.get("study_id") and recorded.get("resolved") == resolved):
            return
        design = {**recorded["design"], "arms": arms, "contrasts": design["contrasts"]}
    else:
        seeds, study_id = study.seeds, uuid.uuid4().hex[:8]
    write_json_atomically(path, {"design": design, "seeds": seeds, "study_id": study_id, "resolved": resolved,
                                 **source_provenance()})


def read_study_file(root: Path) -> dict:
    """`study.json` of the study directory `root`, or a `UsageError` naming it."""
    path = root / STUDY_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{root} is not a study directory (no {STUDY_FILE}).") from None
    except ValueError as error:
        raise UsageError(f"{path} is not valid JSON ({error}); it is written whole or not at all, so it was edited "
                         "by hand: restore it from the config the study was made with.") from None


def load_design(root: Path) -> Study:
    """The study a directory is bound to, with every seed it has been given."""
    recorded = read_study_file(root)
    return Study.from_design(recorded["design"], recorded["seeds"])


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


def read_record(path: Path) -> dict:
    """A run's record (or a base evaluation's), or a `UsageError` naming a file that cannot be read: records are
    written whole or not at all, so a broken one was cut or edited outside the study."""
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise UsageError(f"{path} is not a readable record ({error.__class__.__name__}: {error}); delete it to do "
                         "that run again (the next `trl-thr study` with the same config redoes it).") from None


def check_same_base(root: Path, model: str, fingerprint: str | None) -> None:
    """Refuse to add runs to a directory whose finished runs (or base evaluation) started from other weights."""
    if fingerprint is None:
        return
    made = sorted((root / "records").glob("*.json")) + [root / "base-eval" / "base.json"]
    for path in made:
        if path.exists() and (other := read_record(path).get("base_sha256")) not in (None, fingerprint):
            raise UsageError(
                f"{path.relative_to(root)} started from a base model with weights {other}, but {model} now has "
                f"{fingerprint}: a recipe's fine-tuning is reproducible on one machine, not across CPUs or library "
                "builds. Bring the study's base/ directory along with its records, or run the missing seeds in "
                "another output_dir (--seeds).")


def portable(value, root: Path):
    """`value` (a record: mappings, lists, strings) with every path inside the study directory `root` written
    relative to it, so that a record holds no path of the machine that made it; other strings unchanged."""
    if isinstance(value, dict):
        return {key: portable(item, root) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item, root) for item in value]
    if isinstance(value, str) and "/" in value:
        try:
            relative = Path(value).resolve().relative_to(root.resolve())
        except (ValueError, OSError):
            return value
        return relative.as_posix() if str(relative) != "." else "."
    return value


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


# Fields whose check depends on the machine that parses them (TrainingArguments refuses bf16 where no GPU supports it):
# set so when a study's runs train on other machines (a SLURM cluster's nodes) than the one checking their configs.
ANY_MACHINE = {"use_cpu": True, "bf16": False, "fp16": False, "tf32": None}


def resolve_arm(study: Study, arm: Arm, root: Path, trains_here: bool = True) -> dict:
    """Parse an arm's train config with `trl-thr train`'s own parser (one line naming the arm and the field for a bad
    key or value); the `thr_strategy`, signed `thr_p` and `max_grad_norm` its runs train with. `trains_here=False`
    leaves out the checks that depend on this machine's hardware (`ANY_MACHINE`): the runs' own nodes make them."""
    import tempfile

    from ..thr import STRATEGIES_USING_P, signed_p
    from .commands import train as train_command

    seed = study.seeds[0]
    config = run_train_config(study, arm, seed, root / "runs" / run_name(arm.name, seed))
    if not trains_here:
        config.update(ANY_MACHINE)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "train.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            (_, training, model, *_), _ = train_command.parse_args(["--config", str(path)])
        except UsageError as error:
            raise UsageError(f"arm {arm.name}: {str(error).replace(str(path), 'its train config')}") from None
    if "thr_p" in arm.overrides and training.thr_strategy not in STRATEGIES_USING_P:
        raise UsageError(f"arm {arm.name}: thr_p={arm.overrides['thr_p']} has no effect with thr_strategy="
                         f"{training.thr_strategy!r}; use one of {', '.join(STRATEGIES_USING_P)}.")
    if not model.model_name_or_path:
        raise UsageError("train.model_name_or_path is not set (or use a prepare recipe).")
    return {"thr_strategy": training.thr_strategy, "thr_p": signed_p(training.thr_strategy, training.thr_p),
            "max_grad_norm": training.max_grad_norm}


def validate(study: Study, root: Path, recipe_makes_benchmark: bool = False,
             trains_here: bool = True) -> dict[str, dict]:
    """Parse every arm's train config and the eval config with the commands' own parsers, before anything trains:
    one line naming the arm and the field for a bad key or value. Returns each arm's `thr_strategy`, signed `thr_p`
    and `max_grad_norm` as training will use them."""
    import tempfile

    from .commands import eval as eval_command

    if study.reference_arm is not None and study.reference_arm not in [arm.name for arm in study.arms]:
        raise UsageError(f"reference_arm={study.reference_arm!r} is not one of the arms "
                         f"{[arm.name for arm in study.arms]}.")
    if not study.evals or not all(fields_.get("benchmark") for fields_ in study.evals.values()):
        raise UsageError("no evaluation set: set eval.benchmark in the study config (or --benchmark): a preset "
                         "(math-500, aime24, gsm8k-test, ...), 'arithmetic', or a local JSONL file.")
    resolved = {arm.name: resolve_arm(study, arm, root, trains_here) for arm in study.arms}
    with tempfile.TemporaryDirectory() as scratch:
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
                 prepare=study.prepare, reference_arm=study.reference_arm, contrasts=study.contrasts)
