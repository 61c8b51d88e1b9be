"""`trl-thr`: train with THR, evaluate greedy accuracy and Pass@K, and look at THR per token.

    trl-thr train   [--config run.yaml] [--field value ...]   # no arguments: a short CPU demo
    trl-thr eval    --model_name_or_path ... --benchmark ...
    trl-thr analyze --model_name_or_path ... --dataset_name ...
    trl-thr study   --config study.yaml --output_dir DIR      # arms over paired seeds, with intervals

Each subcommand parses its own arguments with TRL's `TrlParser`: `--config` YAML files, CLI flags that override
them, and `--help` listing every field.
"""

import argparse
import importlib
import sys
import warnings
from pathlib import Path

from trl_thr.cli.errors import UsageError

COMMANDS = {
    "train": ("trl_thr.cli.commands.train", "Train with THRGRPOTrainer (no arguments: a short offline CPU demo)."),
    "eval": ("trl_thr.cli.commands.eval", "Greedy accuracy and unbiased Pass@K of a model on a math benchmark."),
    "analyze": ("trl_thr.cli.commands.analyze", "Sample groups, compute THR per token, and write a report."),
    "study": ("trl_thr.cli.commands.study", "Train and evaluate arms over paired seeds, and compare them."),
}
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

# TRL (1.14 and 1.16) spells the field `gradient_checkpointing` (its configs default it to True) and reads
# `model.is_gradient_checkpointing`; transformers >= 5.23 renamed both to `activation_checkpointing` and warns on every
# TRL run. Nothing a user of TRL's argument names can change avoids them, so the command line does not print them.
UPSTREAM_RENAME_WARNINGS = ("`gradient_checkpointing` is deprecated", "`is_gradient_checkpointing` is deprecated")


def ignore_upstream_rename_warnings() -> None:
    for message in UPSTREAM_RENAME_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def packaged_config(name: str) -> Path | None:
    """A recipe shipped with the package (`trl_thr/cli/configs/<name>.yaml`: demo, tiny_cpu, study_tiny), by name."""
    import importlib.resources

    path = Path(str(importlib.resources.files("trl_thr.cli.configs").joinpath(f"{name.removesuffix('.yaml')}.yaml")))
    return path if "/" not in name and path.is_file() else None


def packaged_config_names() -> list[str]:
    import importlib.resources

    return sorted(p.name[: -len(".yaml")] for p in importlib.resources.files("trl_thr.cli.configs").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_config(path: str) -> str:
    """A `--config` value: an existing file, else the packaged recipe of that name (`--config tiny_cpu`)."""
    if Path(path).is_file():
        return path
    packaged = packaged_config(path)
    return str(packaged) if packaged is not None else path


def split_config_flag(argv: list[str]) -> list[str]:
    """`argv` with `--config=file.yaml` written as `--config file.yaml`, the form `TrlParser` reads, and a packaged
    recipe's name (`--config tiny_cpu`) replaced by its file."""
    split = []
    for arg in argv:
        split += ["--config", arg.split("=", 1)[1]] if arg.startswith("--config=") else [arg]
    if "--config" in split and split.index("--config") + 1 < len(split):
        index = split.index("--config") + 1
        split[index] = resolve_config(split[index])
    return split


def check_config_file(argv: list[str]) -> None:
    """A `--config` in `argv` names an existing file holding a YAML mapping; else a `UsageError` naming the problem
    (line and column for a YAML syntax error)."""
    import yaml

    if "--config" not in argv:
        return
    index = argv.index("--config")
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        raise UsageError("--config needs a YAML file.")
    path = argv[index + 1]
    if not Path(path).is_file():
        raise UsageError(f"config file {path} does not exist (recipes shipped with trl-thr, by name: "
                         f"{', '.join(packaged_config_names())}).")
    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"config file {path} is not valid YAML{where}: {problem}.") from error
    except UnicodeDecodeError as error:
        raise UsageError(f"config file {path} is not a text file ({error.reason}).") from error
    if not isinstance(config, dict):
        raise UsageError(f"config file {path} must hold a YAML mapping of field: value, got {type(config).__name__}.")


def parse_arguments(dataclass_types: tuple, argv: list[str], command: str) -> tuple:
    """Parse `argv` (with an optional `--config` YAML) into `dataclass_types` with TRL's parser.

    A key or flag no dataclass knows, a file that is not YAML, or a value a config rejects in `__post_init__`, is a
    `UsageError` that names it, not argparse's traceback or a silent pass-through.
    """
    from trl import TrlParser

    argv = split_config_flag(argv)
    check_config_file(argv)
    description = importlib.import_module(COMMANDS[command][0]).__doc__ if command in COMMANDS else None
    parser = TrlParser(dataclass_types, prog=f"trl-thr {command}", description=description,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    for action in parser._actions:  # argparse gives `--no_x` the help of `--x`, which says the opposite
        if action.option_strings and action.option_strings[0].startswith("--no_") and action.const is False:
            action.help = f"Set {action.dest} to false (see --{action.dest})."

    def one_line_error(message: str):  # argparse would print the whole usage (hundreds of lines) before it
        raise UsageError(f"{message}. See `trl-thr {command} --help`.")

    parser.error = one_line_error
    # TrlParser reads --config itself before argparse sees the arguments; declared here so that --help lists it.
    parser.add_argument("--config", metavar="YAML", help="YAML file of field: value; flags given after override it.")
    try:
        *parsed, from_config, from_cli = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    # The declared --config comes back as an extra namespace after the dataclasses (HfArgumentParser's leftovers).
    parsed = [p for p in parsed if not isinstance(p, argparse.Namespace)]
    see = f"See `trl-thr {command} --help` for the accepted fields."
    if from_config:
        config = argv[argv.index("--config") + 1]
        names = [s.lstrip("-") for s in from_config if s.startswith("--")] or from_config
        raise UsageError(f"unknown key(s) in {config}: {', '.join(names)}. {see}")
    if from_cli:
        names = [s for s in from_cli if s.startswith("--")] or from_cli
        raise UsageError(f"unknown argument(s): {' '.join(names)}. {see}")
    return tuple(parsed)


def interrupted_message(module, argv: list[str]) -> str:
    """What an interrupted subcommand kept and how to go on: the module's `interrupted_message(argv)` if it has one.

    A subcommand that keeps partial results (eval's generation cache, train's checkpoints) says where they are; one
    that writes everything at the end (analyze) needs no function of its own.
    """
    describe = getattr(module, "interrupted_message", None)
    if describe is not None:
        try:
            return describe(argv)
        except Exception:  # noqa: BLE001 - the arguments may be what was wrong; the interruption is the news
            pass
    return "nothing was written (the results are saved at the end); rerun the same command to start again."


def run(command: str, argv: list[str] | None = None) -> int:
    """Run a subcommand: a `UsageError` becomes one line on stderr and exit status 2, Ctrl-C one line saying what
    was kept and exit status 130."""
    argv = sys.argv[1:] if argv is None else argv
    ignore_upstream_rename_warnings()
    module = None
    try:
        module = importlib.import_module(COMMANDS[command][0])  # inside: importing TRL takes seconds
        module.main(argv)
    except UsageError as error:
        print(f"trl-thr {command}: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        if not getattr(error, "one_line", False):  # an untested TRL says so in one line; anything else is a bug
            raise
        print(f"trl-thr {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from trl_thr.cli.launch import reports_interruption

        if reports_interruption():  # once per run, not once per launched process
            print(f"\ntrl-thr {command}: interrupted: {interrupted_message(module, argv)}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trl-thr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_text) in COMMANDS.items():
        subcommands.add_parser(name, help=help_text, add_help=False)  # the subcommand's own parser prints --help
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return run(args.command, rest)


if __name__ == "__main__":
    sys.exit(main())
