"""`trl-thr study`: does an arm change what a run learns? Train every (arm, seed), evaluate each, compare over seeds.

    trl-thr study --config study_tiny --output_dir runs/study-tiny      # a recipe shipped with the package
    trl-thr study --config study.yaml --output_dir runs/s --arms grpo positive-amplify \\
        "entropy20=thr_strategy:none,top_entropy_quantile:0.2" --seeds 0 1 2 3 --workers 2
    trl-thr study --train_config run.yaml --arms grpo negative-amplify --seeds 0 1 2 3 4 5 6 7 \\
        --benchmark math-500 --n_samples 16 --k_values 1 4 16 --output_dir runs/s --learning_rate 1e-6
    trl-thr study --report runs/s                   # the report of a study directory, from its records

A study config (YAML) has these sections; flags override them:

    train:          a `trl-thr train` config (TRL's argument names, thr_* fields, launch fields), or a path to one
    arms:           [grpo, positive-amplify, "amplify:-0.5", "entropy20=thr_strategy:none,top_entropy_quantile:0.2"]
                    or a mapping label: {field: value}; a label that names an arm (grpo, a thr_strategy,
                    strategy:p) starts from that arm's fields
    seeds:          [0, 1, ...], at least 2; paired across arms (TRL's seed and data_seed)
    reference_arm:  the arm the others are compared with, seed by seed (default grpo, if an arm)
    contrasts:      more paired differences to report, e.g. ["positive-amplify - negative-amplify"]
    eval:           `trl-thr eval` fields (benchmark, n_samples, k_values, backend, ...); the prompt template and
                    max_new_tokens default to training's. Or `evals:` {name: fields} for several sets.
    prepare:        optional recipe run once before training, e.g. {recipe: arithmetic-scratch, ...}: it makes the
                    data splits and the base model, and sets train.model_name_or_path, train.dataset_name and
                    eval.benchmark

Each run trains with `trl-thr train` (so `num_processes` and `accelerate_config` work as there) into
`<output_dir>/runs/<arm>-s<seed>/model`, with its own output_dir, seed and data_seed and one checkpoint at the end
(set by the study: an arm may not set them), and is evaluated with `trl-thr eval`. Its record (`records/<run>.json`)
is written atomically: a killed study resumes with the same command, skipping finished runs. At the end (and with
`--report`), `results.json`, `results.md` and plots are written: each arm's mean and 95 % t-interval per metric, each
arm minus the reference arm paired by seed, slopes on p, and the minimum detectable effect at 80 % power for
intervals that contain 0 (docs/cli.md, "trl-thr study").

Where runs go (`launcher:` section, or flags of the same names):

    --launcher local    the default: `--workers` runs at a time on this machine
    --launcher slurm    one SLURM job per run (and per preparation and base evaluation), with the section's
                        resources (partition, account, qos, time, nodes, gpus_per_node, cpus_per_task, mem,
                        sbatch_options, setup, python); this command watches them, starts a failed, cancelled or
                        preempted job again (up to --max_retries), and writes the report. Stopped, it leaves the jobs
                        running; the same command again watches them and goes on. --cancel cancels them.

    trl-thr study --config study.yaml --output_dir runs/s --launcher slurm --partition gpu --dry_run
"""

import argparse
import sys
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from trl_thr.cli import check_config_file, resolve_config, run
from trl_thr.cli.errors import UsageError

SECTIONS = ("train", "arms", "seeds", "reference_arm", "contrasts", "eval", "evals", "prepare", "launcher")
EVAL_FLAGS = ("benchmark", "n_samples", "k_values", "backend", "max_problems")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a `UsageError` (one line, exit 2) instead of the whole usage."""

    def error(self, message):
        raise UsageError(f"{message}. See `trl-thr study --help`.")


def build_parser() -> argparse.ArgumentParser:
    from trl_thr.cli.study_launchers import LauncherConfig

    # No prefix matching: an unknown flag goes to the train section, never to a study flag it abbreviates (`--seed 5`
    # is not `--seeds 5`).
    parser = OneLineParser(prog="trl-thr study", description=__doc__, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="Study config: train, arms, seeds, eval, prepare, launcher "
                        "sections.")
    parser.add_argument("--output_dir", help="The study directory (created; a restart with the same config resumes).")
    parser.add_argument("--report", metavar="DIR", help="Only write the report of the study in DIR, from its records.")
    parser.add_argument("--train_config", metavar="YAML", help="A `trl-thr train` config, used as the train section.")
    parser.add_argument("--arms", nargs="+", help="Arms, replacing the config's (see above).")
    parser.add_argument("--seeds", nargs="+", type=int, help="Seeds, replacing the config's (at least 2).")
    parser.add_argument("--reference_arm", help="Arm the others are compared with, seed by seed (default: grpo).")
    parser.add_argument("--benchmark", help="Evaluation set (eval.benchmark): a preset, 'arithmetic' or a file.")
    parser.add_argument("--n_samples", type=int, help="Samples per problem for Pass@K (eval.n_samples).")
    parser.add_argument("--k_values", nargs="+", type=int, help="K values, each <= n_samples (eval.k_values).")
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"],
                        help="Evaluation backend (eval.backend); auto: vLLM if installed and a GPU is present.")
    parser.add_argument("--max_problems", type=int, help="Evaluate a seeded random subset (eval.max_problems).")
    parser.add_argument("--num_processes", type=int, help="Processes per training run, as in `trl-thr train`.")
    parser.add_argument("--accelerate_config", help="accelerate preset or file per training run, as in `trl-thr "
                        "train`.")
    parser.add_argument("--dry_run", action="store_true", help="Print the units still to do, the command and "
                        "resources of each and the estimated GPU-hours; submit and write nothing.")
    parser.add_argument("--seconds_per_step", type=float, help="For --dry_run's estimate: seconds of one training "
                        "step on a run's GPUs (default: from a finished run of the directory).")
    parser.add_argument("--cancel", action="store_true", help="Cancel the study's queued and running SLURM jobs.")
    parser.add_argument("--run", metavar="UNIT", help="Do one unit of the study in --output_dir, as its study.json "
                        "says (prepare, base or a run name): what a SLURM job runs.")
    launcher = parser.add_argument_group("launcher (the launcher: section's fields; --launcher is its type)")
    for spec in fields(LauncherConfig):
        flag = "--launcher" if spec.name == "type" else f"--{spec.name}"
        if typing.get_origin(spec.type) is list:  # one item per flag: --sbatch_options=--exclusive
            launcher.add_argument(flag, dest=f"launcher_{spec.name}", action="append", metavar="ITEM",
                                  help=spec.metadata["help"] + " On the command line, one item per flag.")
            continue
        kind = next(kind for kind in typing.get_args(spec.type) or (spec.type,) if kind is not type(None))
        launcher.add_argument(flag, dest=f"launcher_{spec.name}", type=kind, metavar=spec.name.upper(),
                              choices=spec.metadata.get("choices"), help=spec.metadata["help"])
    return parser


def train_flags(rest: list[str]) -> dict:
    """`--field value [value ...]` flags for the train section (TRL's names), read as YAML scalars."""
    from trl_thr.cli.study import read_scalar

    values, key = {}, None
    for token in rest:
        if token.startswith("--"):
            key = token[2:].replace("-", "_")
            if "=" in key:
                key, value = key.split("=", 1)
                values[key] = read_scalar(value)
                key = None
            else:
                values[key] = True  # a bare boolean flag, unless values follow
        elif key is None:
            raise UsageError(f"unexpected argument {token!r}: train fields are given as --field value.")
        else:
            value = read_scalar(token)
            previous = values[key]
            values[key] = value if previous is True else (previous if isinstance(previous, list) else [previous]) \
                + [value]
    return values


def read_yaml(path: str, what: str) -> dict:
    path = resolve_config(path)
    check_config_file(["--config", path])
    return yaml.safe_load(Path(path).read_text()) or {}


def build_study(args, rest: list[str]):
    """The `Study` of the config file and flags, with every section checked."""
    from trl_thr.cli.study import STUDY_SET_TRAIN_FIELDS, Study, check_seeds, parse_arms, parse_contrasts

    config = read_yaml(args.config, "study config") if args.config else {}
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise UsageError(f"unknown section(s) in {args.config}: {', '.join(unknown)}; a study config has "
                         f"{', '.join(SECTIONS)}.")
    train = config.get("train") or {}
    if isinstance(train, str):  # a path, from where the command runs or else beside the study config
        beside = Path(args.config).parent / train
        train = read_yaml(train if Path(train).is_file() or not beside.is_file() else str(beside), "train config")
    if args.train_config:
        train = read_yaml(args.train_config, "train config")
    if not isinstance(train, dict):
        raise UsageError("train must be a mapping of `trl-thr train` fields, or the path of a YAML file of them.")
    flags = train_flags(rest)
    owned = [f"--{key}" for key in flags if key in STUDY_SET_TRAIN_FIELDS]
    if owned:
        raise UsageError(f"{', '.join(owned)}: the study sets each run's output directory, seed and checkpoints; "
                         "give the seeds with --seeds and the study directory with --output_dir.")
    train = {**train, **flags}
    for name in ("num_processes", "accelerate_config"):
        if getattr(args, name) is not None:
            train[name] = getattr(args, name)
    if "eval" in config and "evals" in config:
        raise UsageError("give either eval (one evaluation set) or evals (several, by name), not both.")
    evals = config.get("evals") or {"": config.get("eval") or {}}
    if not isinstance(evals, dict) or not all(isinstance(v, dict) for v in evals.values()):
        raise UsageError("eval must be a mapping of `trl-thr eval` fields (evals: a mapping name -> fields).")
    eval_flags = {name: getattr(args, name) for name in EVAL_FLAGS if getattr(args, name) is not None}
    evals = {name: {**set_fields, **eval_flags} for name, set_fields in evals.items()}
    arms = args.arms if args.arms is not None else config.get("arms")
    if arms is None:
        raise UsageError("no arms: give --arms or an arms section (e.g. grpo positive-amplify negative-amplify).")
    seeds = args.seeds if args.seeds is not None else config.get("seeds")
    if seeds is None:
        raise UsageError("no seeds: give --seeds or a seeds section (at least 2).")
    parsed_arms = parse_arms(arms)
    reference = args.reference_arm or config.get("reference_arm")
    if reference is None and "grpo" in [arm.name for arm in parsed_arms]:
        reference = "grpo"
    prepare = config.get("prepare")
    if prepare is not None and not isinstance(prepare, dict):
        raise UsageError("prepare must be a mapping with a recipe field (e.g. recipe: arithmetic-scratch).")
    return Study(train=train, arms=parsed_arms, seeds=check_seeds(seeds), evals=evals, prepare=prepare,
                 reference_arm=reference, contrasts=parse_contrasts(config.get("contrasts", []), parsed_arms))


def build_launcher(args):
    """The `LauncherConfig` of the config's `launcher:` section and the launcher flags (which override it)."""
    from trl_thr.cli.study_launchers import LauncherConfig

    config = read_yaml(args.config, "study config") if args.config else {}
    section = config.get("launcher") or {}
    if not isinstance(section, dict):
        raise UsageError("launcher must be a mapping of launcher fields (type: slurm, partition: ..., ...).")
    given = {name: value for name in LauncherConfig.field_names()
             if (value := getattr(args, f"launcher_{name}")) is not None}
    return LauncherConfig.from_dict({**section, **given})


def main(argv=None):
    from trl_thr.cli.study_coordinator import cancel_study, dry_run, run_study
    from trl_thr.cli.study_report import markdown, write_report

    args, rest = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.report is not None:
        if not (Path(args.report) / "study.json").is_file():
            raise UsageError(f"--report {args.report}: not a study directory (no study.json).")
        print(markdown(write_report(Path(args.report))))
        return None
    if args.output_dir is None:
        raise UsageError("set --output_dir, the study directory.")
    root = Path(args.output_dir)
    if args.run is not None:
        from trl_thr.cli.study_locks import Held
        from trl_thr.cli.study_units import execute_in_job

        try:
            execute_in_job(root, args.run)
        except Held as held:
            raise UsageError(f"--run {args.run}: {held.sentence()}.") from None
        except RuntimeError as error:  # a command of the unit failed: its log says why
            raise UsageError(f"--run {args.run}: {error}") from None
        return None
    launcher = build_launcher(args)
    if args.cancel:
        if not (root / "study.json").is_file():
            raise UsageError(f"--cancel: {root} is not a study directory (no study.json).")
        cancelled = cancel_study(root, launcher)
        print(f"[study] cancelled {len(cancelled)} job(s){': ' + ' '.join(cancelled) if cancelled else ''}")
        return None
    study = build_study(args, rest)
    if args.dry_run:
        from trl_thr.cli.study import check_prepare_fields, validate, with_recipe_outputs
        from trl_thr.cli.study_coordinator import check_resources

        check_prepare_fields(study)
        prepared = with_recipe_outputs(study, root)
        validate(prepared, root, recipe_makes_benchmark=study.prepare is not None,
                 trains_here=launcher.type == "local")
        check_resources(launcher, prepared)
        print(dry_run(prepared, root, launcher, args.seconds_per_step))
        return None
    try:
        results = run_study(study, root, launcher)
    except RuntimeError as error:
        raise UsageError(str(error)) from error
    print(markdown(results))
    print(f"Report: {root / 'results.md'} (and results.json, *.png)")
    return results


def interrupted_message(argv: list[str]) -> str:
    args, _ = build_parser().parse_known_args(argv)
    where = args.output_dir or args.report
    return (f"finished runs are kept in {where}/records; rerun the same command to resume (interrupted runs start "
            "again, an interrupted evaluation resumes from its cache).")


if __name__ == "__main__":
    sys.exit(run("study"))
