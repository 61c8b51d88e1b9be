"""`trl-thr`: train with THR, evaluate greedy accuracy and Pass@K, and look at THR per token.

    trl-thr train   [--config run.yaml] [--field value ...]   # no arguments: a short CPU demo
    trl-thr eval    --model_name_or_path ... --benchmark ...
    trl-thr analyze --model_name_or_path ... --dataset_name ...

Each subcommand parses its own arguments with TRL's `TrlParser`: `--config` YAML files, CLI flags that override
them, and `--help` listing every field.
"""

import argparse
import importlib
import sys

from trl_thr.cli.errors import UsageError

COMMANDS = {
    "train": ("trl_thr.cli.train", "Train with THRGRPOTrainer (no arguments: a short offline CPU demo)."),
    "eval": ("trl_thr.cli.evaluate", "Greedy accuracy and unbiased Pass@K of a model on a math benchmark."),
    "analyze": ("trl_thr.cli.analyze", "Sample groups, compute THR per token, and write a report."),
}


def parse_arguments(dataclass_types: tuple, argv: list[str], command: str) -> tuple:
    """Parse `argv` (with an optional `--config` YAML) into `dataclass_types` with TRL's parser.

    A key or flag no dataclass knows, or a value a config rejects in `__post_init__`, is a `UsageError` that names
    it, not argparse's traceback or a silent pass-through.
    """
    from trl import TrlParser

    try:
        *parsed, from_config, from_cli = TrlParser(dataclass_types, prog=f"trl-thr {command}").parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    see = f"See `trl-thr {command} --help` for the accepted fields."
    if from_config:
        config = argv[argv.index("--config") + 1]
        names = [s.lstrip("-") for s in from_config if s.startswith("--")] or from_config
        raise UsageError(f"unknown key(s) in {config}: {', '.join(names)}. {see}")
    if from_cli:
        names = [s for s in from_cli if s.startswith("--")] or from_cli
        raise UsageError(f"unknown argument(s): {' '.join(names)}. {see}")
    return tuple(parsed)


def run(command: str, argv: list[str] | None = None) -> int:
    """Run a subcommand; a `UsageError` becomes one line on stderr and exit status 2."""
    module = importlib.import_module(COMMANDS[command][0])
    try:
        module.main(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        print(f"trl-thr {command}: error: {error}", file=sys.stderr)
        return 2
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
