"""The core (`trl_thr`, outside `trl_thr.cli`) never imports the command line: arrows point down.

Two checks: every import statement of every core module, read from its source (lazy imports inside functions
included), and what importing every core module in a fresh interpreter actually loads.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "trl_thr"
# `python -m trl_thr` is the command line's entry point, not part of the core.
CORE_MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__main__.py")


def imported_modules(path: Path) -> list[str]:
    """The absolute names of the modules `path` imports, wherever the import statement stands."""
    package = "trl_thr"
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the core package: `.cli`, `..` is never used in it
                base = f"{package}.{base}" if base else package
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__"
        ):
            names += [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    return names


def test_core_modules_import_no_cli_module():
    assert {p.name for p in CORE_MODULES} >= {"thr.py", "thr_grpo_trainer.py", "__init__.py", "tiny.py"}
    offenders = {p.name: [n for n in imported_modules(p) if n.startswith("trl_thr.cli") or n.startswith(".cli")]
                 for p in CORE_MODULES}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_static_check_sees_a_lazy_cli_import(tmp_path):
    module = tmp_path / "core.py"
    module.write_text("def f():\n    from .cli.evaluation import pass_at_k\n    return pass_at_k\n")
    assert "trl_thr.cli.evaluation" in imported_modules(module)


def test_importing_the_whole_core_loads_no_cli_module():
    names = [f"trl_thr.{p.stem}" for p in CORE_MODULES if p.stem not in ("__init__", "__main__")]
    code = (
        "import importlib, sys\n"
        "import trl_thr\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "for name in trl_thr.__all__: getattr(trl_thr, name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('trl_thr.cli')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_paths_said_to_be_ignored_are_ignored(tmp_path):
    """docs/benchmarks.md and benchmarks/gpu_check.py say `.gpu/` (the GPU check's wheels) stays out of git."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["git", "check-ignore", "-q", ".gpu/results.json"], cwd=root)
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert result.returncode == 0
