"""`trl-thr study --launcher slurm` against a real one-node SLURM (`slurm_cluster`): the records and the report equal
the local launcher's, a cancelled job is submitted again, a run that always fails ends failed after `max_retries`, a
coordinator stopped by Ctrl-C or kill -9 is replaced by the same command without any run submitted twice, `--cancel`
cancels, `--dry_run` lists what is left, and bad launcher settings are refused in one line before any job."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import slurm_cluster
import yaml
from helpers import TINY_STUDY, start_study, train_invocations

from trl_thr.cli import main as cli_main

TIMINGS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time", "thr/seconds",
           "thr/forward_seconds")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started, why = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    if started is None:
        pytest.skip(f"no SLURM cluster: {why}")
    yield started
    started.stop()


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    return cluster


def study_config(tmp_path: Path, **launcher) -> Path:
    """The packaged tiny study with a launcher section, and an arm whose runs always fail (a reward that does not
    exist: `trl-thr train` stops when it loads it). Its other arms are the tiny study's, as a mapping."""
    config = yaml.safe_load(TINY_STUDY.read_text())
    config["arms"] = {"grpo": None, "positive-amplify": None,
                      "broken": {"thr_strategy": "none", "reward_funcs": ["no_such_module:reward"]}}
    config["launcher"] = {"type": "slurm", "cpus_per_task": 1, "poll_seconds": 0.5, **launcher}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def squeue_names(cluster) -> list[str]:
    return cluster.run("squeue", "--noheader", "--format=%j").stdout.split()


def jobs_of(directory: Path, run: str) -> list[dict]:
    path = directory / "runs" / run / "slurm_jobs.json"
    return json.loads(path.read_text())["attempts"] if path.exists() else []


def job_state(cluster, job_id: str) -> str:
    return cluster.run("squeue", "--noheader", "--format=%T", f"--jobs={job_id}").stdout.strip()


def wait_for(condition, timeout: float = 300, what: str = "", processes=()):
    deadline = time.time() + timeout
    while not condition():
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(f"the study ended ({process.returncode}) before {what}: {process.stdout.read()}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Watcher(threading.Thread):
    """Polls the queue through the whole test: no run may ever have two jobs queued or running at once."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster, self.twice, self.stop = cluster, [], threading.Event()

    def run(self):
        while not self.stop.wait(0.3):
            names = squeue_names(self.cluster)
            self.twice += [name for name in set(names) if names.count(name) > 1]


def comparable(record: dict) -> dict:
    """What a run learned and scored, without its timings and where it ran."""
    return {"metrics": record["metrics"],
            "log_history": [{k: v for k, v in entry.items() if k not in TIMINGS} for entry in record["log_history"]]}


def test_a_study_on_slurm(on_cluster, local_tiny_study, tmp_path):
    """The tiny study through SLURM: seed 1 and the base evaluation come from the local study (copied records: a
    study takes any record that is there), seed 0's runs and the broken arm are SLURM jobs."""
    cluster, directory = on_cluster, tmp_path / "study"
    local = local_tiny_study["directory"]
    for copied in ("records/grpo-s1.json", "records/positive-amplify-s1.json", "base-eval/base.json"):
        (directory / copied).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local / copied, directory / copied)
    config = study_config(tmp_path, max_retries=1)
    env = dict(cluster.env)
    watcher = Watcher(cluster)
    watcher.start()

    # 1. A job cancelled while it trains is submitted again; a second coordinator is refused meanwhile.
    first = start_study(directory, config=config, env=env)
    log = directory / "runs" / "grpo-s0" / "log.txt"
    wait_for(lambda: log.exists() and "$ trl-thr train" in log.read_text(), what="grpo-s0's training",
             processes=[first])
    cancelled = jobs_of(directory, "grpo-s0")[0]["job_id"]
    assert cluster.run("scancel", cancelled).returncode == 0
    second = start_study(directory, config=config, env=env)
    refusal = second.communicate(timeout=120)[0]
    assert second.returncode == 2 and "another `trl-thr study` is coordinating" in refusal, refusal
    wait_for(lambda: len(jobs_of(directory, "grpo-s0")) == 2, what="grpo-s0 submitted again", processes=[first])
    resubmitted = jobs_of(directory, "grpo-s0")[1]["job_id"]
    wait_for(lambda: job_state(cluster, resubmitted) == "RUNNING", what="the new grpo-s0 job", processes=[first])

    # 2. kill -9 on the coordinator while jobs run; the same command watches them (it submits nothing twice: the
    # watcher sees every run's jobs), and 3. Ctrl-C on it leaves them running and says which; --cancel cancels them.
    first.kill()
    first.wait()
    live = [name for name in squeue_names(cluster) if name.startswith("trl-thr-")]
    assert live, "jobs keep running without their coordinator"
    again = start_study(directory, config=config, env=env)
    lock = directory / "coordinator.lock"
    wait_for(lambda: lock.exists() and str(again.pid) in lock.read_text(), what="the second coordinator's lock",
             processes=[again])
    time.sleep(3)  # past reattaching
    os.killpg(again.pid, signal.SIGINT)
    interrupted = again.communicate(timeout=60)[0]
    assert again.returncode == 130, interrupted
    watched = re.search(r"watching (\d+) job\(s\) submitted before", interrupted)
    assert watched and 1 <= int(watched.group(1)) <= len(live), interrupted
    assert "SLURM job(s) keep running" in interrupted and "add --cancel to cancel them" in interrupted, interrupted
    assert [name for name in squeue_names(cluster) if name.startswith("trl-thr-")], interrupted
    assert cli_main(["study", "--config", str(config), "--output_dir", str(directory), "--cancel"]) == 0
    wait_for(lambda: not [n for n in squeue_names(cluster) if n.startswith("trl-thr-")], timeout=60,
             what="the cancelled jobs to leave the queue")

    # 4. The same command finishes the study: the runs cancelled by --cancel are submitted again, the broken arm
    # ends failed after its retry, named with its logs, and the report covers the rest.
    last = start_study(directory, config=config, env=env)
    output = last.communicate(timeout=600)[0]
    watcher.stop.set()
    assert last.returncode == 2, output
    for seed in (0, 1):
        jobs = jobs_of(directory, f"broken-s{seed}")
        assert len(jobs) >= 2, jobs
        assert (f"broken-s{seed}: FAILED: job {jobs[-1]['job_id']} failed, exit code 2:0; see "
                f"{directory / 'runs' / f'broken-s{seed}' / ('slurm-' + jobs[-1]['job_id'] + '.out')} and "
                f"{directory / 'runs' / f'broken-s{seed}' / 'log.txt'} (after 2 attempts)") in output, output
    assert "2 unit(s) did not finish: broken-s0" in output, output
    assert watcher.twice == [], f"runs with two live jobs at once: {watcher.twice}"
    assert jobs_of(directory, "grpo-s0")[0] == {**jobs_of(directory, "grpo-s0")[0], "state": "CANCELLED"}
    assert len(jobs_of(directory, "grpo-s0")) >= 2 and train_invocations(directory)["grpo-s0"] <= \
        len(jobs_of(directory, "grpo-s0"))

    # The runs SLURM made learned and scored what they did under the local launcher, and the report says the same.
    for name in ("grpo-s0.json", "positive-amplify-s0.json"):
        assert comparable(json.loads((directory / "records" / name).read_text())) == \
            comparable(json.loads((local / "records" / name).read_text())), name
    mine, theirs = (json.loads((d / "results.json").read_text()) for d in (directory, local))
    assert {arm: mine["arms"][arm] for arm in theirs["arms"]} == theirs["arms"]
    assert mine["vs_grpo"]["positive-amplify"] == theirs["vs_grpo"]["positive-amplify"]
    assert set(mine["missing_runs"]) == {"broken-s0", "broken-s1"}


def test_a_dry_run_lists_what_is_left_and_submits_nothing(on_cluster, local_tiny_study, tmp_path, capsys):
    directory = tmp_path / "study"
    shutil.copytree(local_tiny_study["directory"], directory)
    (directory / "records" / "positive-amplify-s1.json").unlink()
    config = study_config(tmp_path, partition="debug", time="0:30:00")
    assert cli_main(["study", "--config", str(config), "--output_dir", str(directory), "--dry_run",
                     "--seconds_per_step", "12.5"]) == 0
    out = capsys.readouterr().out
    assert "3 of 6 runs to do" in out, out
    for name in ("positive-amplify-s1", "broken-s0", "broken-s1"):
        assert f"  {name}: {sys.executable} -m trl_thr study --output_dir {directory} --run {name}" in out, out
    assert "grpo-s0:" not in out and "#SBATCH --partition=debug" in out and "#SBATCH --time=0:30:00" in out, out
    # 3 runs x 2 steps x 12.5 s, with the evaluation of the first finished run.
    evaluation = json.loads((directory / "records" / "grpo-s0.json").read_text())["eval_seconds"]
    hours = 3 * (2 * 12.5 + evaluation) / 3600
    assert f"Estimate: 3 run(s), {hours:.2f} h of jobs x 1 GPU(s) per run = {hours:.2f} GPU-hours" in out, out
    assert not list(directory.rglob("slurm_jobs.json")) and not list(directory.rglob("job.sh"))
    assert squeue_names(on_cluster) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--partition", "gpu-h100"], "launcher.partition='gpu-h100' is not a partition of this cluster (sinfo "
                                      "lists debug*)"),
        (["--gpus_per_node", "1"], "SLURM would refuse the jobs (sbatch: error: "),
        (["--sbatch_options=--mem-per-cpu=1G", "--mem", "1G"], "SLURM would refuse the jobs ("),
    ],
)
def test_the_scheduler_refuses_before_any_job(on_cluster, tmp_path, capsys, flags, message):
    config = study_config(tmp_path)
    assert cli_main(["study", "--config", str(config), "--output_dir", str(tmp_path / "study"), *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
    assert squeue_names(on_cluster) == [] and not (tmp_path / "study").exists()


def test_slurm_without_sbatch_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, and no sbatch
    config = study_config(tmp_path)
    assert cli_main(["study", "--config", str(config), "--output_dir", str(tmp_path / "study")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("trl-thr study: error: --launcher slurm: sbatch is not on the PATH; run the study from a machine "
                     "that submits SLURM jobs (a login node), or use --launcher local."), error


def test_an_unknown_launcher_field_is_refused(tmp_path, capsys):
    config = yaml.safe_load(study_config(tmp_path).read_text())
    config["launcher"]["gpus"] = 8
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["study", "--config", str(path), "--output_dir", str(tmp_path / "study")]) == 2
    error = capsys.readouterr().err
    assert "launcher: unknown field(s) gpus; a launcher has type, max_retries, workers, partition" in error, error


def test_a_job_script_is_what_sbatch_reads(tmp_path):
    """The script a unit's job runs: its resources as #SBATCH lines, the setup lines, then the unit."""
    from trl_thr.cli.study import Study, parse_arms
    from trl_thr.cli.study_launchers import LauncherConfig, SlurmLauncher
    from trl_thr.cli.study_units import run_units

    config = LauncherConfig.from_dict({"type": "slurm", "partition": "gpu", "account": "lab", "qos": "high",
                                       "time": "24:00:00", "gpus_per_node": 8, "cpus_per_task": 64, "mem": "512G",
                                       "sbatch_options": ["--exclusive"], "setup": ["module load cuda/12.4",
                                                                                     "source venv/bin/activate"]})
    study = Study(train={}, arms=parse_arms(["grpo"]), seeds=[0, 1], evals={"": {}})
    unit = run_units(study)[0]
    script = SlurmLauncher(config, study, Path("runs/paper"), "0123abcd", cwd=tmp_path).script(unit)
    assert script.splitlines()[2:] == [
        "#SBATCH --job-name=trl-thr-0123abcd-grpo-s0", "#SBATCH --output=runs/paper/runs/grpo-s0/slurm-%j.out",
        f"#SBATCH --chdir={tmp_path.resolve()}", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high", "#SBATCH --time=24:00:00",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "#SBATCH --mem=512G", "#SBATCH --exclusive",
        "set -e", "module load cuda/12.4", "source venv/bin/activate",
        "exec python -m trl_thr study --output_dir runs/paper --run grpo-s0"]
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_a_job_of_several_nodes_trains_on_each(monkeypatch):
    """With nodes: 2, the unit's training is one srun task per node, each accelerate's machine $SLURM_NODEID, machine
    0 being the batch script's node (a one-node cluster runs only the single-node path of this)."""
    from trl_thr.cli.study_units import across_nodes

    monkeypatch.delenv("SLURM_JOB_NUM_NODES", raising=False)
    assert across_nodes(["train", "--config", "t.yaml"]) is None
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-017")
    assert across_nodes(["train", "--config", "runs/x/train.yaml"]) == [
        "srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "bash", "-c",
        f"exec {sys.executable} -m trl_thr train --config runs/x/train.yaml --num_machines 2 "
        '--main_process_ip gpu-017 --machine_rank "$SLURM_NODEID"']
    shown = subprocess.run(["bash", "-c", across_nodes(["train"])[-1].replace("exec ", "echo ", 1)],
                           env={**os.environ, "SLURM_NODEID": "1"}, capture_output=True, text=True)
    assert shown.stdout.split()[-2:] == ["--machine_rank", "1"]


def test_the_paper_recipes_launcher_section_uncommented_is_a_valid_launcher(tmp_path):
    """The paper comparison's commented `launcher:` section, once uncommented, parses and fits its runs (8 processes,
    one per GPU)."""
    from trl_thr.cli.commands.study import build_launcher, build_parser, build_study
    from trl_thr.cli.study_coordinator import check_resources

    recipe = Path(__file__).parents[1] / "examples" / "configs" / "study_paper_qwen2.5_math_1.5b.yaml"
    lines = recipe.read_text().splitlines()
    start = lines.index("# launcher:")
    section = [line[2:] for line in lines[start:] if line.startswith("# ")]
    uncommented = tmp_path / "configs" / recipe.name
    uncommented.parent.mkdir()
    shutil.copy(recipe.parent / "paper_qwen2.5_math_1.5b.yaml", uncommented.parent)
    uncommented.write_text("\n".join(lines[:start] + section) + "\n")
    args, rest = build_parser().parse_known_args(["--config", str(uncommented), "--output_dir", str(tmp_path / "s"),
                                                  "--num_processes", "8", "--accelerate_config", "multi_gpu"])
    launcher = build_launcher(args)
    assert (launcher.type, launcher.gpus_per_node, launcher.time) == ("slurm", 8, "2-00:00:00")
    check_resources(launcher, build_study(args, rest))
