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

from trl_thr.errors import UsageError

COMMANDS = {
    "train": ("trl_thr.scripts.train", "Train with THRGRPOTrainer (no arguments: a short offline CPU demo)."),
    "eval": ("trl_thr.scripts.evaluate", "Greedy accuracy and unbiased Pass@K of a model on a math benchmark."),
    "analyze": ("trl_thr.scripts.analyze", "Sample groups, compute THR per token, and write a report."),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trl-thr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_text) in COMMANDS.items():
        subcommands.add_parser(name, help=help_text, add_help=False)  # the subcommand's own parser prints --help
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        module.main(rest)
    except UsageError as error:
        print(f"trl-thr {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
