"""`trl-thr study`: its arms, its refusals, its locks, overrides reaching the trainer, and a whole tiny study run by
workers that are killed, restarted and run side by side."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import pytest
import yaml
from helpers import length_reward, tiny_dataset
from trl import GRPOTrainer

from trl_thr import THRGRPOTrainer
from trl_thr.cli import main as cli_main
from trl_thr.cli.errors import UsageError
from trl_thr.cli.study import (Arm, Study, base_fingerprint, bind_directory, claim, parse_arm, parse_arms, run_name,
                               run_train_config)

ROOT = Path(__file__).resolve().parents[1]
TINY_STUDY = ROOT / "src" / "trl_thr" / "cli" / "configs" / "study_tiny.yaml"


@pytest.mark.parametrize(
    "spec, name, overrides",
    [
        ("grpo", "grpo", {"thr_strategy": "none"}),
        ("negative-amplify", "negative-amplify", {"thr_strategy": "negative-amplify"}),
        ("amplify:-0.25", "amplify:-0.25", {"thr_strategy": "amplify", "thr_p": -0.25}),
        ("entropy20=thr_strategy:none,top_entropy_quantile:0.2", "entropy20",
         {"thr_strategy": "none", "top_entropy_quantile": 0.2}),
        ("amplify:0.5=max_grad_norm:0", "amplify:0.5", {"thr_strategy": "amplify", "thr_p": 0.5, "max_grad_norm": 0}),
        ("amplify:0.5-noclip=thr_strategy:amplify,thr_p:0.5", "amplify:0.5-noclip",
         {"thr_strategy": "amplify", "thr_p": 0.5}),
    ],
)
def test_arms_and_the_fields_they_set(spec, name, overrides):
    assert parse_arm(spec) == Arm(name, overrides)
    assert run_name(name, 3) == f"{name.replace(':', '_p')}-s3"


def test_a_yaml_mapping_of_arms():
    arms = parse_arms({"grpo": None, "noclip": {"thr_strategy": "none", "max_grad_norm": 0}})
    assert arms == [Arm("grpo", {"thr_strategy": "none"}), Arm("noclip", {"thr_strategy": "none", "max_grad_norm": 0})]


def study_cli(tmp_path, *flags, config=TINY_STUDY):
    return cli_main(["study", "--config", str(config), "--output_dir", str(tmp_path / "study"), *flags])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--arms", "grpo", "amplfy"], "unknown arm 'amplfy'"),
        (["--arms", "grpo", "x=thr_strategy:none,top_entropy_quantle:0.2"], "arm x: unknown key(s)"),
        (["--arms", "grpo", "dominant-only:0.2"], "does not use p"),
        (["--arms", "grpo", "x=thr_strategy:nthr,thr_p:0.3"], "thr_p=0.3 has no effect with thr_strategy='nthr'"),
        (["--arms", "grpo", "x=thr_strategy:amplify,thr_p:1.5"], "arm x: thr_p=1.5: |p| must be < 1"),
        (["--seeds", "0"], "at least 2"),
        (["--seeds", "0", "0"], "given twice"),
        (["--k_values", "1", "8"], "eval: "),
        (["--reference_arm", "entropy20"], "reference_arm='entropy20' is not one of the arms"),
        (["--bogus_section_field", "1"], "unknown key(s)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_work(flags, message, tmp_path, capsys):
    assert study_cli(tmp_path, *flags) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("trl-thr study: error:") and message in error and "\n" not in error, error
    assert not (tmp_path / "study").exists()


def test_a_study_without_an_evaluation_set_is_refused(tmp_path, capsys):
    config = yaml.safe_load(TINY_STUDY.read_text())
    del config["eval"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert study_cli(tmp_path, config=path) == 2
    assert "no evaluation set: set eval.benchmark" in capsys.readouterr().err


def test_a_directory_made_with_another_config_is_refused(tmp_path, capsys):
    config = yaml.safe_load(TINY_STUDY.read_text())
    study = Study(train={**config["train"], "learning_rate": 0.5}, arms=parse_arms(config["arms"]),
                  seeds=[0, 1], evals={"": config["eval"]}, reference_arm="grpo")
    (tmp_path / "study").mkdir()
    bind_directory(study, tmp_path / "study")
    assert study_cli(tmp_path) == 2
    error = capsys.readouterr().err
    assert "is a study made with a different config (train.learning_rate: 0.5 -> 0.001)" in error
    # More seeds and more arms extend a study; the arms it has keep their fields.
    bigger = Study(train=study.train, arms=[*study.arms, Arm("dominant-only", {"thr_strategy": "dominant-only"})],
                   seeds=[0, 1, 2], evals=study.evals, reference_arm="grpo")
    bind_directory(bigger, tmp_path / "study")
    recorded = json.loads((tmp_path / "study" / "study.json").read_text())
    assert recorded["seeds"] == [0, 1, 2] and list(recorded["design"]["arms"]) == [
        "grpo", "positive-amplify", "dominant-only"]


def test_arm_fields_reach_the_trainer(tiny_model_path, tmp_path):
    """An arm's `top_entropy_quantile: 0.2` trains with TRL's entropy mask; GRPO does not."""
    from trl_thr.cli.commands import train as train_command

    config = yaml.safe_load(TINY_STUDY.read_text())
    study = Study(train=config["train"], arms=[], seeds=[0, 1], evals={"": config["eval"]})
    for spec, masked in (("entropy20=thr_strategy:none,top_entropy_quantile:0.2", True), ("grpo", False)):
        arm = parse_arm(spec)
        path = tmp_path / f"{arm.name}.yaml"
        path.write_text(yaml.safe_dump(run_train_config(study, arm, 1, tmp_path / arm.name)))
        (_, training_args, *_), _ = train_command.parse_args(["--config", str(path)])
        assert (training_args.top_entropy_quantile, training_args.seed, training_args.data_seed) == (
            0.2 if masked else 1.0, 1, 1)
        training_args.max_steps = 1
        trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=training_args,
                                 train_dataset=tiny_dataset())
        with patch.object(GRPOTrainer, "get_high_entropy_mask", autospec=True,
                          side_effect=GRPOTrainer.get_high_entropy_mask) as mask:
            trainer.train()
        assert mask.called is masked, arm.name


def lock_of(path: Path, host: str, pid: int, age: float = 0.0):
    path.mkdir(parents=True, exist_ok=True)
    (path / "lock").write_text(json.dumps({"host": host, "pid": pid, "token": "t", "since": 0}))
    if age:
        os.utime(path / "lock", (time.time() - age, time.time() - age))


def test_a_live_workers_lock_holds_and_a_dead_ones_is_taken_over(tmp_path):
    held = claim(tmp_path / "a", timeout=600)
    assert held is not None and claim(tmp_path / "a", timeout=600) is None
    held.release()
    assert not (tmp_path / "a" / "lock").exists()

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_of(tmp_path / "b", socket.gethostname(), int(finished.stdout))  # its process has exited
    taken = claim(tmp_path / "b", timeout=600)
    assert taken is not None and json.loads((tmp_path / "b" / "lock").read_text())["pid"] == os.getpid()
    taken.release()

    lock_of(tmp_path / "c", "another-machine", 1, age=60)  # refreshed a minute ago: alive
    assert claim(tmp_path / "c", timeout=600) is None
    lock_of(tmp_path / "d", "another-machine", 1, age=900)  # not refreshed for 15 minutes: its worker is gone
    assert claim(tmp_path / "d", timeout=600) is not None


def start_study(directory: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "trl_thr", "study", "--config", str(TINY_STUDY), "--output_dir",
                             str(directory)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def train_invocations(directory: Path) -> dict[str, int]:
    return {run.name: (run / "log.txt").read_text().count("$ trl-thr train") for run in (directory / "runs").iterdir()
            if (run / "log.txt").exists()}


def test_a_tiny_study_resumes_and_shares_its_runs_between_workers(tmp_path):
    """One worker is killed after its first run; two more start together: every run is done once (the killed
    worker's unfinished run is taken over), the report is written, and running the study again redoes nothing."""
    directory = tmp_path / "study"
    first = start_study(directory)
    deadline = time.time() + 300
    while not list((directory / "records").glob("*.json")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished_first = [path.stem for path in (directory / "records").glob("*.json")]
    assert finished_first == ["grpo-s0"], first.stdout.read()
    started_before = train_invocations(directory)

    workers = [start_study(directory) for _ in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    names = ["grpo-s0", "positive-amplify-s0", "grpo-s1", "positive-amplify-s1"]
    assert sorted(path.stem for path in (directory / "records").glob("*.json")) == sorted(names)
    trained = train_invocations(directory)
    for name in names:  # once, or twice for the run the killed worker had started and not finished
        assert trained[name] == 1 + started_before.get(name, 0) - (name in finished_first), (name, trained, outputs)
    assert any("runs done" in output for output in outputs)
    results = json.loads((directory / "results.json").read_text())
    assert {arm: values["greedy_accuracy"]["n"] for arm, values in results["arms"].items()} == {
        "grpo": 2, "positive-amplify": 2}
    assert "positive-amplify" in results["vs_grpo"] and results["missing_runs"] == []

    again = start_study(directory)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "4/4 runs done" in output, output
    assert train_invocations(directory) == trained

    # Every run records the weights it started from; a directory whose runs started elsewhere takes no more runs.
    fingerprint = base_fingerprint("builtin:tiny-qwen2")
    assert fingerprint and {json.loads(p.read_text())["base_sha256"] for p in (directory / "records").glob("*.json")} \
        == {fingerprint}
    (directory / "records" / "grpo-s1.json").unlink()
    moved = json.loads((directory / "records" / "grpo-s0.json").read_text())
    (directory / "records" / "grpo-s0.json").write_text(json.dumps({**moved, "base_sha256": "0123456789abcdef"}))
    elsewhere = start_study(directory)
    output = elsewhere.communicate(timeout=300)[0]
    assert elsewhere.returncode == 2 and "records/grpo-s0.json started from a base model with weights " \
        f"0123456789abcdef, but builtin:tiny-qwen2 now has {fingerprint}" in output, output
    assert train_invocations(directory) == trained


STUDY_CONFIGS = list(dict.fromkeys(path.resolve() for path in [  # examples/configs links study_tiny: once
    *sorted(ROOT.glob("examples/configs/study_*.yaml")), TINY_STUDY, *sorted(ROOT.glob("benchmarks/steering/*/study.yaml"))]))


@pytest.mark.parametrize("config", STUDY_CONFIGS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_committed_study_config_is_valid(config, tmp_path):
    """Each recipe parses and every arm's train config and every eval set pass the commands' own checks (a GPU
    recipe with its precision switched to a CPU's)."""
    from trl_thr.cli.commands.study import build_parser, build_study
    from trl_thr.cli.study import validate, with_recipe_outputs

    cpu = ["--bf16", "false", "--use_cpu", "true"] if "qwen" in config.name else []
    args, rest = build_parser().parse_known_args(["--config", str(config), "--output_dir", str(tmp_path), *cpu])
    study = with_recipe_outputs(build_study(args, rest), tmp_path)
    resolved = validate(study, tmp_path, recipe_makes_benchmark=study.prepare is not None)
    assert list(resolved) == [arm.name for arm in study.arms] and len(study.seeds) >= 2


def test_no_committed_script_or_config_holds_an_absolute_path():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    import re

    absolute = re.compile(r"(?<![\w.:/~-])/(tmp|work|root|home|Users)/")
    scripts = [p for p in tracked if not p.startswith("tests/")
               and (p.endswith((".sh", ".yaml", ".yml", ".py", "Makefile")) or p.startswith(".ci/"))]
    offenders = [p for p in scripts if absolute.search((ROOT / p).read_text(errors="ignore"))]
    assert offenders == []


def test_a_contrast_names_two_arms(tmp_path, capsys):
    config = yaml.safe_load(TINY_STUDY.read_text())
    config["contrasts"] = ["positive-amplify - dominant-only"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert study_cli(tmp_path, config=path) == 2
    assert "contrast 'positive-amplify - dominant-only': 'dominant-only' is not an arm of this study" \
        in capsys.readouterr().err
    config["contrasts"] = ["positive-amplify-grpo"]
    path.write_text(yaml.safe_dump(config))
    assert study_cli(tmp_path, config=path) == 2
    assert "contrast 'positive-amplify-grpo': write it as 'arm - arm'" in capsys.readouterr().err


def test_named_strategies_sit_at_their_signed_p():
    """negative-amplify's thr_p 0.1 trains at p = -0.1: its record, the dose line and the report say -0.1."""
    from trl_thr.cli.study import validate
    from trl_thr.cli.study_report import strategy_and_p

    config = yaml.safe_load(TINY_STUDY.read_text())
    study = Study(train=config["train"], arms=parse_arms(["positive-amplify", "negative-amplify", "amplify:-0.3"]),
                  seeds=[0, 1], evals={"": config["eval"]})
    resolved = validate(study, Path("unused"))
    assert {arm: values["thr_p"] for arm, values in resolved.items()} == {
        "positive-amplify": 0.1, "negative-amplify": -0.1, "amplify:-0.3": -0.3}
    legacy = {"train_config": {"thr_strategy": "negative-amplify", "thr_p": 0.1}}  # the earlier records' layout
    assert strategy_and_p(legacy) == ("negative-amplify", -0.1)


def test_a_reasoning_gym_task_is_split_by_question(tmp_path):
    import json as json_module

    from trl_thr.cli.study_recipes import ArithmeticScratchRecipe, prepare_task

    recipe = ArithmeticScratchRecipe.from_dict(dict(task="reasoning-gym:letter_counting", test_problems=20,
                                                    train_problems=40, sft_problems=60,
                                                    task_config={"min_words": 5, "max_words": 15}))
    paths = prepare_task(recipe, tmp_path / "data")
    splits = {name: [json_module.loads(line) for line in Path(paths[name]).read_text().splitlines()]
              for name in ("test", "train", "sft")}
    assert [len(splits[n]) for n in ("test", "train", "sft")] == [20, 40, 60]
    questions = [row["question"] for rows in splits.values() for row in rows]
    assert len(set(questions)) == 120 and paths["test_questions_seen_in_training"] == 0
    assert all(row["answer"].isdigit() for row in splits["test"])
    assert prepare_task(recipe, tmp_path / "data") == paths  # written once, read again


def test_a_base_record_without_its_base_model_is_refused(tmp_path):
    """base.json copied without base/ (the weights): one line saying what to copy, not a missing-model error later;
    with base/ there, the recipe uses it as it is."""
    from trl_thr.cli.study_recipes import ArithmeticScratchRecipe, prepare

    recipe = ArithmeticScratchRecipe.from_dict(dict(test_problems=8, train_problems=16, sft_problems=16))
    (tmp_path / "base.json").write_text(json.dumps({"recipe": "arithmetic-scratch"}))
    with pytest.raises(UsageError, match=r"base.json says the base model was made, but .*base is missing: copy the "
                                         r"study's base/ directory with base.json, or remove base.json"):
        prepare(recipe, tmp_path, "chat-boxed-short", 12)
    (tmp_path / "base").mkdir()
    assert prepare(recipe, tmp_path, "chat-boxed-short", 12)["model"] == str(tmp_path / "base")


@pytest.mark.parametrize(
    "fields, message",
    [({"task": "gsm8k"}, "must be 'arithmetic' or 'reasoning-gym:<task>'"),
     ({"task_config": {"min_words": 3}}, "task_config is for a reasoning-gym task"),
     ({"task": "reasoning-gym:letter_counting", "split_by": "fact"}, "splits by question"),
     ({"sft_lr_typo": 1}, "unknown field(s) sft_lr_typo")],
)
def test_recipe_fields_are_checked(fields, message):
    from trl_thr.cli.study_recipes import ArithmeticScratchRecipe

    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ArithmeticScratchRecipe.from_dict(fields)


def test_a_command_the_study_started_ends_when_the_study_is_killed(tmp_path):
    """`trl-thr` commands a study runs ask Linux to end them with the study (no orphan training into a run that
    another worker then takes over); a process that is not the study's own child is left alone."""
    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    child = ("from trl_thr.cli.study import die_with_parent; die_with_parent(); import os, time; "
             "print(os.getpid(), flush=True); time.sleep(120)")
    parent = (f"import os, subprocess, sys, time; env = {{**os.environ, 'TRL_THR_STUDY_PID': str(os.getpid())}}; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}], env=env); time.sleep(120)")
    study = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child_pid = int(study.stdout.readline())
    study.kill()
    study.wait()

    def running(pid):
        try:
            return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
        except (FileNotFoundError, IndexError):
            return False

    deadline = time.time() + 20
    while running(child_pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not running(child_pid)
