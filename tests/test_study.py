"""`trl-thr study`: its arms, its refusals, its locks, overrides reaching the trainer, and a whole tiny study run by
workers that are killed, interrupted, restarted and run side by side (the SLURM launcher: test_study_slurm.py)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import pytest
import yaml
from helpers import TINY_STUDY, length_reward, start_study, tiny_dataset, train_invocations
from trl import GRPOTrainer

from trl_thr import THRGRPOTrainer
from trl_thr.cli import main as cli_main
from trl_thr.cli.errors import UsageError
from trl_thr.cli.study import (
    Arm,
    Study,
    base_fingerprint,
    bind_directory,
    parse_arm,
    parse_arms,
    run_name,
    run_train_config,
)
from trl_thr.cli.study_locks import Held, acquire

ROOT = Path(__file__).resolve().parents[1]


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
        (["--arms", "grpo", "x=seed:5"], "arm 'x' sets seed, which the study sets for every run"),
        (["--arms", "grpo", "y=thr_strategy:none,output_dir:elsewhere"], "arm 'y' sets output_dir"),
        (["--seed", "5"], "--seed: the study sets each run's output directory, seed and checkpoints"),
        (["--launcher", "slurm", "--gpus_per_node", "2"], "launcher.gpus_per_node=2 x nodes=1 = 2 GPUs per job, "
                                                         "but a run starts num_processes=1 process(es)"),
        (["--launcher", "slurm", "--time", "1 day"], "launcher.time='1 day' is not a time sbatch reads"),
        (["--max_retries", "-1"], "launcher.max_retries=-1 must be 0 or more"),
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
    bind_directory(study, tmp_path / "study", {})
    assert study_cli(tmp_path) == 2
    error = capsys.readouterr().err
    assert "is a study made with a different config (train.learning_rate: 0.5 -> 0.001)" in error
    # More seeds and more arms extend a study; the arms it has keep their fields.
    bigger = Study(train=study.train, arms=[*study.arms, Arm("dominant-only", {"thr_strategy": "dominant-only"})],
                   seeds=[0, 1, 2], evals=study.evals, reference_arm="grpo")
    bind_directory(bigger, tmp_path / "study", {})
    recorded = json.loads((tmp_path / "study" / "study.json").read_text())
    assert recorded["seeds"] == [0, 1, 2] and list(recorded["design"]["arms"]) == [
        "grpo", "positive-amplify", "dominant-only"]


def test_a_value_is_compared_as_training_reads_it(tmp_path, capsys):
    """YAML 1.1 reads `1e-3` as a string; training reads it as 0.001, and so does the comparison with the directory's
    design. A real difference names its field, not two whole configs."""
    from trl_thr.cli.commands.study import build_parser, build_study
    from trl_thr.cli.study import design_differences

    def design(*flags):
        args, rest = build_parser().parse_known_args(["--config", str(TINY_STUDY), *flags])
        return build_study(args, rest).design()

    assert design_differences(design(), design("--learning_rate", "1e-3")) == []
    assert design_differences(design(), design("--learning_rate", "1e-2")) == ["train.learning_rate: 0.001 -> 0.01"]
    assert design_differences(design(), design("--n_samples", "8")) == ["eval.n_samples: 4 -> 8"]
    assert design_differences(design(), design("--arms", "grpo", "positive-amplify=thr_strategy:positive-amplify,"
                                                "thr_p:0.2")) == ["arm positive-amplify.thr_p: None -> 0.2"]


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


def lock_of(path: Path, **holder):
    path.mkdir(parents=True, exist_ok=True)
    (path / "lock").write_text(json.dumps({"host": socket.gethostname(), "token": "t", "since": 0, **holder}))


def exited_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def test_a_live_workers_lock_holds_and_a_dead_ones_is_taken_over(tmp_path):
    held = acquire(tmp_path / "a" / "lock")
    with pytest.raises(Held) as second:
        acquire(tmp_path / "a" / "lock")
    assert second.value.checkable and f"process {os.getpid()} on {socket.gethostname()}" in str(second.value)
    held.release()
    assert not (tmp_path / "a" / "lock").exists()

    lock_of(tmp_path / "b", pid=exited_pid())  # its process has exited
    said = []
    taken = acquire(tmp_path / "b" / "lock", announce=said.append)
    assert json.loads((tmp_path / "b" / "lock").read_text())["pid"] == os.getpid()
    assert said and said[0].startswith("b: took over the lock of process ") and said[0].endswith(", which has ended")
    taken.release()

    # A live pid that is not the holder's process any more (started at another time) is a recycled pid.
    lock_of(tmp_path / "c", pid=os.getpid(), process_start="1")
    acquire(tmp_path / "c" / "lock").release()


def test_a_lock_of_another_machine_is_never_taken_by_its_pid(tmp_path):
    """Nothing here can tell whether a worker on another machine is alive: its pid means nothing on this one, and
    an old lock may be a long run's. It is named, with how to release it."""
    lock_of(tmp_path / "run", host="another-machine", pid=exited_pid(), since=time.time() - 86400)
    with pytest.raises(Held) as held:
        acquire(tmp_path / "run" / "lock")
    assert not held.value.checkable
    assert "held by process" in str(held.value) and "on another-machine" in str(held.value)
    assert f"if that worker is gone, delete {tmp_path / 'run' / 'lock'}" in str(held.value)


def test_a_tiny_study_resumes_and_shares_its_runs_between_workers(local_tiny_study, tmp_path):
    """One worker is killed after its first run; two more start together: every run is done once (the killed
    worker's unfinished run is taken over, a run the other worker holds is waited for), the report is written, and
    running the study again redoes nothing."""
    directory, seen = local_tiny_study["directory"], local_tiny_study
    assert seen["finished_first"] == ["grpo-s0"], seen["first_output"]
    assert seen["returncodes"] == [0, 0], seen["outputs"]
    names = ["grpo-s0", "positive-amplify-s0", "grpo-s1", "positive-amplify-s1"]
    assert sorted(path.stem for path in (directory / "records").glob("*.json")) == sorted(names)
    trained = train_invocations(directory)
    for name in names:  # once, or twice for the run the killed worker had started and not finished
        assert trained[name] == 1 + seen["started_before"].get(name, 0) - (name in seen["finished_first"]), (
            name, trained, seen["outputs"])
    # Each run says when it starts training and evaluating, with its log; the counts line follows its end.
    assert "grpo-s0: training (log " in seen["first_output"] and "grpo-s0: evaluating (log " in seen["first_output"]
    assert all("4/4 runs done" in output for output in seen["outputs"]), seen["outputs"]
    assert not list(directory.rglob("lock")), "a finished study leaves no lock"
    results = json.loads((directory / "results.json").read_text())
    assert {arm: values["greedy_accuracy"]["n"] for arm, values in results["arms"].items()} == {
        "grpo": 2, "positive-amplify": 2}
    assert "positive-amplify" in results["vs_grpo"] and results["missing_runs"] == []

    copy = tmp_path / "study"  # the session's directory stays as it is for the other tests
    shutil.copytree(directory, copy)
    again = start_study(copy)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "4/4 runs done" in output, output
    assert train_invocations(copy) == trained

    # Every run records the weights it started from; a directory whose runs started elsewhere takes no more runs.
    fingerprint = base_fingerprint("builtin:tiny-qwen2")
    assert fingerprint and {json.loads(p.read_text())["base_sha256"] for p in (copy / "records").glob("*.json")} \
        == {fingerprint}
    (copy / "records" / "grpo-s1.json").unlink()
    moved = json.loads((copy / "records" / "grpo-s0.json").read_text())
    (copy / "records" / "grpo-s0.json").write_text(json.dumps({**moved, "base_sha256": "0123456789abcdef"}))
    elsewhere = start_study(copy)
    output = elsewhere.communicate(timeout=300)[0]
    assert elsewhere.returncode == 2 and "records/grpo-s0.json started from a base model with weights " \
        f"0123456789abcdef, but builtin:tiny-qwen2 now has {fingerprint}" in output, output
    assert train_invocations(copy) == trained


def test_records_hold_no_path_of_the_machine(local_tiny_study):
    """Paths in records, base.json and study.json are relative to the study directory: a study can be moved."""
    directory = local_tiny_study["directory"]
    made = [*directory.glob("records/*.json"), directory / "base-eval" / "base.json", directory / "study.json"]
    for path in made:
        text = path.read_text()
        assert str(directory) not in text and str(directory.resolve()) not in text, path
    record = json.loads((directory / "records" / "grpo-s0.json").read_text())
    assert record["train_config"]["output_dir"] == "runs/grpo-s0/model"
    assert record["eval_config"]["model"] == "runs/grpo-s0/model"


def test_a_corrupt_record_is_named_with_what_to_do(local_tiny_study, tmp_path, capsys):
    copy = tmp_path / "study"
    shutil.copytree(local_tiny_study["directory"], copy)
    (copy / "records" / "grpo-s1.json").write_text('{"arm": "grpo", "seed": 1, "metri')  # cut short
    for argv in (["study", "--report", str(copy)], ["study", "--config", str(TINY_STUDY), "--output_dir", str(copy)]):
        assert cli_main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and f"{copy / 'records' / 'grpo-s1.json'} is not a readable record" \
            in error and "delete it to do that run again" in error, error


def wait_for(condition, timeout: float = 300, process: subprocess.Popen | None = None, what: str = ""):
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the study ended ({process.returncode}) before {what}: {process.stdout.read()}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def commands_of(directory: Path) -> list[int]:
    """Processes running a `trl-thr` command on a file of the study in `directory`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command = (proc / "cmdline").read_bytes().split(b"\0")
                state = (proc / "status").read_text().split("State:")[1].split()[0]
            except (OSError, IndexError):
                continue
            if b"trl_thr" in b" ".join(command) and str(directory).encode() in b" ".join(command) \
                    and b"study" not in command and state not in ("Z", "X"):
                found.append(int(proc.name))
    return found


def test_a_study_killed_while_its_command_starts_leaves_no_orphan(tmp_path):
    """kill -9 on the study in the instant its first command starts (before that command has imported anything):
    the command ends with it, instead of training on as an orphan beside the next study."""
    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    directory = tmp_path / "study"
    study = start_study(directory)
    log = directory / "base-eval" / "log.txt"
    wait_for(lambda: log.exists() and "$ trl-thr eval" in log.read_text(), process=study, what="its first command")
    wait_for(lambda: commands_of(directory), timeout=10, what="the command's process")
    study.kill()  # the study alone, as the OOM killer would: not its process group
    study.wait()
    time.sleep(3)  # importing trl alone takes longer: a command still alive now is an orphan
    assert commands_of(directory) == []


def test_ctrl_c_stops_the_study_and_releases_its_locks(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while a run trains: exit 130, a line saying what was kept,
    and no lock left behind for another worker to skip."""
    directory = tmp_path / "study"
    study = start_study(directory, "--workers", "2")
    train_log = directory / "runs" / "grpo-s0" / "log.txt"
    wait_for(lambda: train_log.exists() and "$ trl-thr train" in train_log.read_text(), process=study,
             what="a run's training")
    time.sleep(2)
    os.killpg(study.pid, signal.SIGINT)
    output = study.communicate(timeout=120)[0]
    assert study.returncode == 130, output
    assert "interrupted:" in output and "their locks released" in output, output
    assert not list(directory.rglob("lock")), output
    assert commands_of(directory) == []


STUDY_CONFIGS = list(dict.fromkeys(path.resolve() for path in [  # examples/configs links study_tiny: once
    *sorted(ROOT.glob("examples/configs/study_*.yaml")), TINY_STUDY,
    *sorted(ROOT.glob("benchmarks/steering/*/study.yaml"))]))


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


def test_no_committed_file_holds_a_path_of_the_machine_that_made_it():
    """Scripts, configs, docs, records, logs, results and notebook outputs: every committed text file reads from a
    fresh clone, with paths relative to its study directory or the repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    import re

    absolute = re.compile(r"(?<![\w.:/~-])/(tmp|work|root|home|Users)/")
    offenders = []
    for name in tracked:
        data = (ROOT / name).read_bytes() if (ROOT / name).is_file() else b""
        if b"\0" in data[:8192]:  # a binary file: weights, images
            continue
        found = absolute.search(data.decode(errors="ignore"))
        offenders += [f"{name}: {found.group(0)}"] if found else []
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


def test_a_base_below_its_sft_target_is_said_recorded_reported_and_refused_on_request(tmp_path, capsys):
    """Fine-tuning that stops below sft_target: one line saying by how much, the probe's accuracy and the target in
    base.json, a warning at the top of the report, and with require_sft_target a refusal at every start."""
    from trl_thr.cli import study_report
    from trl_thr.cli.study_recipes import ArithmeticScratchRecipe, check_sft_target, prepare

    recipe = ArithmeticScratchRecipe.from_dict(dict(test_problems=8, train_problems=16, sft_problems=32,
                                                    scratch_hidden=16, scratch_layers=1, sft_steps=2,
                                                    sft_eval_every=1, sft_target=0.9, sft_batch_size=4))
    prepare(recipe, tmp_path, "chat-boxed-short", 6)
    record = json.loads((tmp_path / "base.json").read_text())
    assert record["sft"]["target_reached"] is False and record["sft"]["steps"] == 2
    capsys.readouterr()  # the fine-tuning's own lines
    check_sft_target(recipe, tmp_path / "base.json")
    said = capsys.readouterr().out.strip()
    assert said.startswith("[study] warning: the base model's fine-tuning ended at ") and \
        "% greedy accuracy on its probe after 2 steps, below its sft_target of 90 %" in said
    kept = ("test_problems", "train_problems", "sft_problems", "sft_steps", "sft_target")
    strict = ArithmeticScratchRecipe.from_dict({**{k: getattr(recipe, k) for k in kept}, "require_sft_target": True})
    with pytest.raises(UsageError, match="below its sft_target of 90 %.*set require_sft_target: false to go on"):
        check_sft_target(strict, tmp_path / "base.json")
    (tmp_path / "study.json").write_text(json.dumps({"design": {"arms": {}}, "seeds": [0, 1]}))
    result = study_report.summarize(tmp_path)
    assert result["base_warning"].startswith("the base model's fine-tuning ended at ")


def test_preparing_a_base_prints_no_deepspeed_accelerator_warning(tmp_path):
    """transformers imports DeepSpeed, which would warn that it is "Setting accelerator to CPU" on a machine without
    CUDA: the study's preparation (in the study process, or a job) tells it first."""
    from trl_thr.cli.study import Study

    study = Study(train={"prompt_template": "chat-boxed-short", "max_completion_length": 6}, arms=[], seeds=[0, 1],
                  evals={"": {}}, prepare={"recipe": "arithmetic-scratch", "test_problems": 8, "train_problems": 16,
                                           "sft_problems": 32, "scratch_hidden": 16, "scratch_layers": 1,
                                           "sft_steps": 1, "sft_eval_every": 1})
    code = ("import sys, json; from pathlib import Path; from trl_thr.cli.study import Study; "
            "from trl_thr.cli.study_units import execute_prepare; "
            f"execute_prepare(Study(**json.loads({json.dumps(json.dumps(study.__dict__))})), Path(sys.argv[1]))")
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "base" / "config.json").exists()
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr


def fake_commands(arguments, log, children=None):
    """`trl-thr train` and `eval` as `study_units.run_command` runs them, without a model: a checkpoint with a log
    history, and an evaluation result whose metrics say which set they come from."""
    config = yaml.safe_load(Path(arguments[2]).read_text())
    out = Path(config["output_dir"])
    if arguments[0] == "train":
        (out / "checkpoint-2").mkdir(parents=True)
        (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 2,
                                                                                               "reward": 0.5}]}))
    else:
        accuracy = {"math": 0.25, "aime": 0.125}[config["benchmark"]]
        result = {"metrics": {"greedy_accuracy": accuracy, "pass@1": accuracy},
                  "config": {"benchmark": config["benchmark"]}}
        (out / f"{config['run_name']}.json").write_text(json.dumps(result))
    return 1.0


def test_a_run_with_p_in_its_name_is_recorded_where_the_study_looks_with_every_evaluation_set(tmp_path):
    """The record of `amplify:0.5` is `records/amplify_p0.5-s0.json`, where every worker looks for it (a restart does
    not train it again), and holds the metrics of each evaluation set, not of the first only."""
    from trl_thr.cli.study_units import execute, run_units

    config = yaml.safe_load(TINY_STUDY.read_text())
    study = Study(train=config["train"], arms=parse_arms(["amplify:0.5"]), seeds=[0, 1],
                  evals={"math": {"benchmark": "math"}, "aime": {"benchmark": "aime"}})
    bind_directory(study, tmp_path, {"amplify:0.5": {"thr_strategy": "amplify", "thr_p": 0.5, "max_grad_norm": 1.0}})
    unit = run_units(study)[0]
    with patch("trl_thr.cli.study_units.run_command", side_effect=fake_commands) as commands:
        execute(study, tmp_path, unit, {"base_sha256": None})
        assert unit.done(tmp_path) and (tmp_path / "records" / "amplify_p0.5-s0.json").exists()
        execute(study, tmp_path, unit, {"base_sha256": None})  # done: nothing runs again
    assert [call.args[0][0] for call in commands.call_args_list] == ["train", "eval", "eval"]
    record = json.loads((tmp_path / "records" / "amplify_p0.5-s0.json").read_text())
    assert record["metrics"] == {"math/greedy_accuracy": 0.25, "math/pass@1": 0.25, "aime/greedy_accuracy": 0.125,
                                 "aime/pass@1": 0.125}
    assert set(record["eval_config"]) == {"math", "aime"} and record["thr_p"] == 0.5


def test_a_restart_with_other_evaluation_settings_is_refused(tmp_path, capsys):
    """Runs evaluated differently do not join one study: n_samples or the benchmark of a restart must match."""
    config = yaml.safe_load(TINY_STUDY.read_text())
    bind_directory(Study(train=config["train"], arms=parse_arms(config["arms"]), seeds=[0, 1],
                         evals={"": config["eval"]}, reference_arm="grpo"), tmp_path / "study", {})
    for flags, difference in ((["--n_samples", "8"], "eval.n_samples: 4 -> 8"),
                              (["--benchmark", "gsm8k-test"], "eval.benchmark: 'arithmetic' -> 'gsm8k-test'")):
        assert study_cli(tmp_path, *flags) == 2
        assert f"is a study made with a different config ({difference})" in capsys.readouterr().err


def test_the_split_keeps_the_test_questions_out_of_training_and_is_the_same_every_time(tmp_path):
    """Arithmetic by question: no test question in the RL or fine-tuning split; by fact: no test fact (operation,
    operands) in them, in any phrasing; either way the same files from the same fields (a seeded draw)."""
    import re

    from trl_thr.cli.study_recipes import ArithmeticScratchRecipe, prepare_task

    def fact(question):
        a, b = map(int, re.findall(r"\d+", question)[:2])
        operation = "add" if ("+" in question or "more" in question) else "sub" if (
            "-" in question or "gives away" in question) else "mul"
        return operation, a, b

    for split_by in ("question", "fact"):
        recipe = ArithmeticScratchRecipe.from_dict(dict(split_by=split_by, max_operand=12, test_problems=40,
                                                        train_problems=120, sft_problems=200))
        paths = prepare_task(recipe, tmp_path / split_by / "a" / "data")
        again = prepare_task(recipe, tmp_path / split_by / "b" / "data")
        rows = {name: [json.loads(line) for line in Path(paths[name]).read_text().splitlines()]
                for name in ("test", "train", "sft")}
        for name in ("test", "train", "sft"):
            assert Path(paths[name]).read_bytes() == Path(again[name]).read_bytes(), (split_by, name)
        seen = {row["question"] for name in ("train", "sft") for row in rows[name]}
        assert not seen & {row["question"] for row in rows["test"]} and paths["test_questions_seen_in_training"] == 0
        if split_by == "fact":
            trained = {fact(question) for question in seen}
            assert not trained & {fact(row["question"]) for row in rows["test"]}


def test_every_recipe_and_launcher_field_is_documented():
    """docs/cli.md lists each field of the `prepare:` recipe (in its table) and of the `launcher:` section."""
    from dataclasses import fields

    from trl_thr.cli.study_launchers import LauncherConfig
    from trl_thr.cli.study_recipes import ArithmeticScratchRecipe

    text = (ROOT / "docs" / "cli.md").read_text()
    assert [f.name for f in fields(ArithmeticScratchRecipe) if f"| `{f.name}` |" not in text] == []
    slurm_section = text.split("## `trl-thr study` on a SLURM cluster")[1].split("\n## ")[0]
    assert [name for name in LauncherConfig.field_names() if name not in ("type", "workers")
            and f"`{name}`" not in slurm_section] == []


def test_a_run_held_by_a_worker_of_another_machine_is_named_with_its_holder_and_the_rest_is_reported(tmp_path):
    """A lock written on another machine is never taken over: the study does every other run, writes the report, and
    ends naming the run, its holder and the file to delete once that worker is gone (not exit 0 with a silent gap)."""
    from trl_thr.cli.study_coordinator import run_study

    config = yaml.safe_load(TINY_STUDY.read_text())
    study = Study(train=config["train"], arms=parse_arms(["grpo"]), seeds=[0, 1],
                  evals={"": {"benchmark": "math"}}, reference_arm="grpo")
    root = tmp_path / "study"
    lock_of(root / "runs" / "grpo-s1", host="another-machine", pid=4242, since=time.time() - 3600)
    with patch("trl_thr.cli.study_units.run_command", side_effect=fake_commands):
        with pytest.raises(RuntimeError) as stopped:
            run_study(study, root)
    message = str(stopped.value)
    assert message.startswith("1 unit(s) did not finish: grpo-s1 (skipped: ") and "process 4242 on another-machine" \
        in message and f"if that worker is gone, delete {root / 'runs' / 'grpo-s1' / 'lock'}" in message
    assert (root / "records" / "grpo-s0.json").exists() and not (root / "records" / "grpo-s1.json").exists()
    assert json.loads((root / "results.json").read_text())["missing_runs"] == ["grpo-s1"]
