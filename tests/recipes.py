"""Every committed recipe, shrunk only in scale, for a rehearsal that a CPU can run (test_recipes.py, and with vLLM
real_vllm/test_recipes_vllm.py).

What a rehearsal changes, and nothing else: the model (a tiny random model of the recipe's architecture), the data (a
local copy of the recipe's dataset preset, in the preset's own columns), the number of steps (2), lengths, batch
sizes and process counts, where outputs go, and the device (`use_cpu`). Every other field stays as committed:
`bf16`, `dtype`, gradient checkpointing, the loss type, `beta`, `epsilon`, the importance-sampling level, LoRA,
accelerate's preset, the THR fields, the rewards and templates. vLLM stays only where the engine runs (the real-vLLM
tier); server mode needs a CUDA trainer, so it is rehearsed without vLLM.
"""

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "src" / "trl_thr" / "cli" / "configs"
# Recipes already run exactly as committed elsewhere are not rehearsed again: the demo (`make demo`, in CI),
# tiny_cpu (throughout the tests) and trl_grpo_style (test_trl_yaml.py, on two workers).
RUN_AS_COMMITTED = {PACKAGED / "demo.yaml", PACKAGED / "tiny_cpu.yaml", ROOT / "examples/configs/tiny_cpu.yaml",
                    ROOT / "examples/configs/trl_grpo_style.yaml"}
TRAIN_RECIPES = sorted(set(ROOT.glob("examples/configs/*.yaml")) - set(ROOT.glob("examples/configs/study_*.yaml"))
                       - RUN_AS_COMMITTED)
STUDY_RECIPES = sorted(ROOT.glob("examples/configs/study_*.yaml"))
# The architecture of each model a recipe names: its rehearsal trains a tiny random model of it. A recipe naming
# another model fails here until it is added.
ARCHITECTURES = {"Qwen/Qwen2.5-Math-1.5B": "qwen2", "Qwen/Qwen2.5-Math-7B": "qwen2",
                 "HuggingFaceTB/SmolLM2-135M-Instruct": "llama"}
# Rows in each preset's own columns (trl_thr.cli.data.PRESETS): the recipe reads them as it reads the hub's copy.
PRESET_ROWS = {
    "math-l3-5": lambda a: {"problem": f"What is {a} + {a}?", "solution": f"It is \\boxed{{{2 * a}}}.",
                            "level": f"Level {3 + a % 3}"},
    "math-500": lambda a: {"problem": f"What is {a} + {a}?", "answer": str(2 * a)},
    "aime24": lambda a: {"problem": f"What is {a} * 3?", "answer": str(3 * a)},
    "aime25": lambda a: {"problem": f"What is {a} * 4?", "answer": str(4 * a)},
    "amc23": lambda a: {"question": f"What is {a} + 5?", "answer": str(a + 5)},
    "minerva": lambda a: {"question": f"What is {a} - 1?", "answer": str(a - 1)},
    "olympiadbench": lambda a: {"question": f"What is {a} + 7?", "final_answer": [str(a + 7)]},
}
STEPS = 2


def preset_file(name: str, directory: Path) -> Path:
    path = directory / f"{name}.jsonl"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(PRESET_ROWS[name](a)) + "\n" for a in range(1, 13)))
    return path


def tiny_model(architecture: str, directory: Path, vllm: bool = False) -> str:
    """A tiny random model of `architecture`; for vLLM, in the width its CPU attention takes."""
    from trl_thr.tiny import VLLM_READY_HIDDEN_SIZE, build_tiny_model

    path = directory / f"tiny-{architecture}{'-vllm' if vllm else ''}"
    if not path.exists():
        build_tiny_model(path, model_type=architecture, **({"hidden_size": VLLM_READY_HIDDEN_SIZE} if vllm else {}))
    return str(path)


def shrink_train(config: dict, directory: Path, output_dir: Path, vllm: bool, study_run: bool = False) -> dict:
    """A recipe's train config at a CPU's scale (see the module docstring); `study_run`: a run of a study, whose
    output directory and checkpoints the study sets."""
    shrunk = dict(config)
    model = shrunk.get("model_name_or_path")
    if model in ARCHITECTURES:
        shrunk["model_name_or_path"] = tiny_model(ARCHITECTURES[model], directory, vllm=vllm)
    elif not str(model).startswith(("builtin:", "/")) and not Path(str(model)).exists():
        raise KeyError(f"{model}: add its architecture to tests/recipes.py ARCHITECTURES")
    if shrunk.get("dataset_name") in PRESET_ROWS:
        shrunk["dataset_data_files"] = str(preset_file(shrunk["dataset_name"], directory / "data"))
    generations = min(int(shrunk.get("num_generations", 8)), 4)
    shrunk.pop("num_train_epochs", None)
    shrunk.update(max_steps=STEPS, num_generations=generations, per_device_train_batch_size=generations,
                  gradient_accumulation_steps=min(int(shrunk.get("gradient_accumulation_steps", 1)), 2),
                  max_completion_length=8, use_cpu=True, report_to="none", logging_steps=1)
    if study_run:
        shrunk.update(save_steps=STEPS)
    else:
        shrunk.update(output_dir=str(output_dir), save_strategy="no")
    if "num_samples" in shrunk or shrunk.get("dataset_name") == "arithmetic":
        shrunk["num_samples"] = 16
    if shrunk.get("num_processes", 1) > 1:
        shrunk["num_processes"] = 1  # still launched through accelerate where the recipe names a preset
    if not vllm or shrunk.get("vllm_mode") == "server":
        shrunk["use_vllm"] = False
    return shrunk


def shrink_study(path: Path, directory: Path) -> dict:
    """A study recipe at a CPU's scale: its preparation (if any) at its smallest, each evaluation set on 2 problems of
    a local copy with 2 samples. Returns the study config as a dict, for `trl-thr study`'s parser."""
    config = yaml.safe_load(path.read_text())
    if isinstance(config.get("train"), str):
        config["train"] = yaml.safe_load((path.parent / Path(config["train"]).name).read_text())
    if config.get("prepare"):
        config["prepare"] = {**config["prepare"], "test_problems": 8, "train_problems": 16, "sft_problems": 32,
                             "scratch_hidden": 16, "scratch_layers": 1, "sft_steps": 1, "sft_eval_every": 1,
                             "sft_batch_size": 4}
    sets = config.get("evals") or {"": config.get("eval") or {}}
    for fields in sets.values():
        if fields.get("benchmark") in PRESET_ROWS:
            fields["benchmark_data_files"] = str(preset_file(fields["benchmark"], directory / "data"))
        fields.update(max_problems=2, n_samples=2, k_values=[1, 2], max_new_tokens=8, backend="transformers")
    if "evals" in config:
        config["evals"] = sets
    else:
        config["eval"] = sets[""]
    config.pop("launcher", None)
    return config
