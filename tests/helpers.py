"""Shared by the test files: the CPU training settings, tiny offline data, rewards that vary within groups, and the
two-process launcher (the tiny model itself comes from `trl_thr.tiny`)."""

from pathlib import Path

# Every trainer the tests build runs on the CPU in float32, without gradient checkpointing, trackers or saving.
CPU = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no")
# The scripts the multi-process tests launch.
WORKERS = Path(__file__).parent / "workers"

PROMPTS = [
    "What is 2 + 3?",
    "What is 7 + 1?",
    "What is 4 - 2?",
    "What is 6 + 6?",
    "Add 5 and 4.",
    "Subtract 3 from 9.",
    "What is 1 + 1?",
    "What is 8 - 5?",
]


def tiny_dataset(num_prompts: int = 8, conversational: bool = False):
    from datasets import Dataset

    prompts = PROMPTS[:num_prompts]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return Dataset.from_dict({"prompt": prompts})


def length_reward(completions, **kwargs):
    """Varies within every group (random completions have random lengths), so advantages are not 0."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(len(t) % 7) for t in texts]


def binary_reward(completion_ids, **kwargs):
    """0/1 "correctness": even number of tokens. Gives groups with a single positive, none, or all."""
    return [float(len(ids) % 2 == 0) for ids in completion_ids]


def same_length_dataset(model_path, num_prompts: int = 8):
    """Prompts that tokenize to the same length, so a batch needs no prompt padding wherever it is cut."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [f"What is {a} + {b}?" for a in range(10) for b in range(10)]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    common = max(set(lengths), key=lengths.count)
    chosen = [p for p, n in zip(prompts, lengths) if n == common][:num_prompts]
    assert len(chosen) == num_prompts
    return Dataset.from_dict({"prompt": chosen})


def launch_two_processes(script, *args, timeout=600, config_file=None):
    """Run `script args` on two CPU processes (accelerate's multi-GPU launcher falls back to gloo), offline; with
    `config_file`, under that accelerate config (e.g. a DeepSpeed one) instead.

    Returns the `subprocess.CompletedProcess`; the caller checks its return code.
    """
    import os
    import subprocess
    import sys

    src = str(Path(__file__).parent.parent / "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), src]))}
    mode = ["--multi_gpu"] if config_file is None else ["--config_file", str(config_file)]
    command = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
               *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


# `trl-thr study` as a user starts it, in its own process group (as a terminal's job): test_study*.py.
TINY_STUDY = Path(__file__).parent.parent / "src" / "trl_thr" / "cli" / "configs" / "study_tiny.yaml"


def start_study(directory: Path, *flags: str, config: Path = TINY_STUDY, env: dict | None = None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "trl_thr", "study", "--config", str(config), "--output_dir",
                             str(directory), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)


def train_invocations(directory: Path) -> dict[str, int]:
    """How many times each run of a study directory started `trl-thr train` (from its log)."""
    return {run.name: (run / "log.txt").read_text().count("$ trl-thr train") for run in (directory / "runs").iterdir()
            if (run / "log.txt").exists()}
