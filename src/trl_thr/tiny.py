"""Public home of the tiny test model: `trl_thr.tiny.build_tiny_model` and `trl_thr.tiny:digit_reward`.

The code lives with the CLI's recipes (`trl_thr.cli.tiny`); this path stays for scripts, YAML files and notebooks
that name it.
"""

from .cli.tiny import CHATML, build_tiny_model, digit_reward

__all__ = ["CHATML", "build_tiny_model", "digit_reward"]
