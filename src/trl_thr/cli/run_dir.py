"""One output directory, one run: what `trl-thr train` checks in `output_dir` before training and records there.

- Before any model is loaded, `prepare_output_dir` checks that `output_dir` can be written, refuses a directory that
  holds another run (its checkpoints, or the model and record of a finished run) unless the run resumes one of its
  checkpoints or `overwrite_output_dir` deletes that run's files, and refuses to resume a checkpoint trained with
  other settings (unless `force_resume`). Settings name the model by what it resolves to (a builtin model's
  directory, a local path made absolute), so a resume spelt with the name or with the path compares equal.
- `RunRecord` writes `trl_thr_run.json` into every checkpoint the run saves (`finished: false`: the run's id, its
  settings, what it resumed from, the step), so a checkpoint says which run wrote it and with which settings; and
  into `output_dir` when the run has finished (`finished: true`, with the versions that ran it), next to the model
  it describes. A run that fails or is interrupted leaves the record of the model saved there before unchanged.
- `interrupted_message` names only checkpoints that the interrupted run wrote.

Every record is written atomically (`trl_thr.files`): a kill at any moment leaves the old record or the new one.
"""

import json
import os
import re
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

from ..files import write_json_atomically
from .errors import UsageError

RUN_RECORD = "trl_thr_run.json"
# The id of the run this process belongs to: set by `trl-thr train` before it trains or launches, and inherited by the
# processes `accelerate launch` starts, so that every process, and the one that reports an interruption, agree on it.
RUN_ID_VARIABLE = "TRL_THR_RUN_ID"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# `GRPOConfig` fields that change what a run learns (with every `thr_*` field): resuming a checkpoint under other
# values is refused unless forced. Logging, saving, reporting and evaluation fields may change between invocations.
TRAINING_FIELDS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "max_grad_norm", "max_steps", "num_train_epochs",
    "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "num_generations",
    "num_iterations", "max_completion_length", "temperature", "top_p", "top_k", "beta", "epsilon", "epsilon_high",
    "loss_type", "importance_sampling_level", "scale_rewards", "mask_truncated_completions", "reward_weights",
    "seed", "data_seed",
)
# Script fields that only say how this invocation behaves, not what it trains.
INVOCATION_FIELDS = ("plot", "overwrite_output_dir", "force_resume")
# What a run writes into its output_dir besides checkpoints (trainer.save_model's files, the record, THR's and TRL's
# logs): `overwrite_output_dir` removes these, and nothing else the directory holds.
RUN_FILES = (RUN_RECORD, "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "adapter_config.json", "adapter_model.safetensors", "training_args.bin", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
             "added_tokens.json", "chat_template.jinja", "README.md", "thr_metrics.png", "thr_summary.json")
RUN_FILE_PATTERNS = ("model-*.safetensors",)
RUN_DIRECTORIES = ("thr_heatmaps", "completions")
SAVED_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def canonical_model(name_or_path: str) -> str:
    """A model as settings record it: a local path made absolute (symlinks resolved), a hub id as it is."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else name_or_path


def run_settings(script_args, model_args, training_args) -> dict:
    """What a run trains: its data, template and rewards, its model settings, and its training and `thr_*` fields.
    JSON-ready (values JSON cannot hold are written as their `str`)."""
    training = training_args.to_dict()
    model = asdict(model_args)
    if model.get("model_name_or_path"):
        model["model_name_or_path"] = canonical_model(model["model_name_or_path"])
    settings = {
        "script": {k: v for k, v in asdict(script_args).items() if k not in INVOCATION_FIELDS},
        "model": model,
        "training": {k: training[k] for k in TRAINING_FIELDS if k in training},
        "thr": {k: v for k, v in training.items() if k.startswith("thr_")},
    }
    return json.loads(json.dumps(settings, default=str))


def setting_differences(old: dict, new: dict) -> dict[str, tuple]:
    """`{field: (old value, new value)}` for every field whose value differs between two `run_settings`."""
    differences = {}
    for group in sorted(set(old) | set(new)):
        before, after = old.get(group, {}), new.get(group, {})
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                differences[name] = (before.get(name), after.get(name))
    return differences


def checkpoints_in(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` directories of `output_dir`, by step."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def read_record(directory: str | Path) -> dict | None:
    """The run record in `directory` (a run's output_dir or one of its checkpoints), or `None`."""
    path = Path(directory) / RUN_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def start_run(launched: bool) -> str:
    """Give the run this invocation starts its id (see `RUN_ID_VARIABLE`): a new one for every invocation, so that two
    runs in one Python process never share one; a process launched by `trl-thr train` keeps its launcher's."""
    if not launched or RUN_ID_VARIABLE not in os.environ:
        os.environ[RUN_ID_VARIABLE] = uuid.uuid4().hex
    return os.environ[RUN_ID_VARIABLE]


def current_run_id() -> str:
    """The id `start_run` gave this run (made here if the run did not go through it)."""
    return os.environ.setdefault(RUN_ID_VARIABLE, uuid.uuid4().hex)


def check_writable(output_dir: str | Path) -> None:
    """`output_dir` exists (created if needed) and a file can be written in it; else one line with the OS's reason."""
    directory = Path(output_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".trl_thr_write_check.{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        existing = next(path for path in (directory, *directory.parents) if path.exists())
        where = f" ({existing} is a file)" if existing.is_file() else ""
        raise UsageError(
            f"output_dir={output_dir} cannot be written: {error.strerror or error}{where}. Choose a directory you "
            "can write to."
        ) from None


def _describe(value) -> str:
    return "unset" if value is None else json.dumps(value)


def remove_run_files(output_dir: str | Path) -> list[str]:
    """Delete an earlier run's checkpoints and files (`RUN_FILES`, `RUN_DIRECTORIES`) from `output_dir`; the names
    removed."""
    directory = Path(output_dir)
    removed = []
    for checkpoint in checkpoints_in(directory):
        shutil.rmtree(checkpoint)
        removed.append(checkpoint.name)
    files = [directory / name for name in RUN_FILES] + [p for pattern in RUN_FILE_PATTERNS
                                                          for p in sorted(directory.glob(pattern))]
    for path in files:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    for name in RUN_DIRECTORIES:
        if (directory / name).is_dir():
            shutil.rmtree(directory / name)
            removed.append(name + "/")
    return removed


def finished_run(output_dir: str | Path) -> dict | None:
    """What a finished run left in `output_dir` (its record, or a saved model without one): `{"steps"}` (or `None`
    steps when unknown), or `None` if there is none."""
    directory = Path(output_dir)
    record = read_record(directory)
    if record is not None and record.get("finished"):
        return {"steps": record.get("global_step")}
    if any((directory / name).is_file() for name in SAVED_MODEL_FILES):
        return {"steps": None}
    return None


def prepare_output_dir(output_dir: str, settings: dict, *, resume_from: str | None, overwrite: bool,
                       force_resume: bool) -> dict | None:
    """`check_output_dir`, then `resume_source`: what the run resumes from, or `None` for a new run."""
    check_output_dir(output_dir, resume_from=resume_from, overwrite=overwrite)
    return resume_source(resume_from, settings, force_resume=force_resume)


def check_output_dir(output_dir: str, *, resume_from: str | None, overwrite: bool) -> None:
    """Check `output_dir` before a model is resolved (see the module docstring); delete an earlier run's files if
    `overwrite`."""
    check_writable(output_dir)
    existing = checkpoints_in(output_dir)
    finished = finished_run(output_dir)
    if overwrite:
        if resume_from is not None:
            raise UsageError("overwrite_output_dir=true starts a new run; it cannot be combined with "
                             "resume_from_checkpoint. Drop one of them.")
        remove_run_files(output_dir)
        return
    resumed_in_place = resume_from is not None and any(
        Path(resume_from).resolve() == checkpoint.resolve() for checkpoint in existing
    )
    start_over = ("--overwrite_output_dir true (deletes that run's model, checkpoints, record, thr_heatmaps/ and "
                  "completions/)")
    if finished is not None and not resumed_in_place:
        steps = f" of {finished['steps']} steps" if finished["steps"] is not None else ""
        held = f" and {len(existing)} checkpoint(s)" if existing else ""
        raise UsageError(
            f"output_dir={output_dir} holds a finished run{steps} (its model{held}); training it again would train "
            f"past its max_steps. Train into a new output_dir, or start over with {start_over}."
        )
    if existing and not resumed_in_place:
        last = existing[-1]
        raise UsageError(
            f"output_dir={output_dir} holds checkpoints of an earlier run ({len(existing)}, the last {last.name}). "
            f"Train into a new output_dir, resume that run with --resume_from_checkpoint {last}, or start over with "
            f"{start_over}."
        )
    if resume_from is not None and not Path(resume_from).is_dir():
        raise UsageError(
            f"resume_from_checkpoint={resume_from} is not a directory (e.g. {output_dir}/checkpoint-500)."
        )


def resume_source(resume_from: str | None, settings: dict, *, force_resume: bool) -> dict | None:
    """What the run resumes from, `{"checkpoint", "settings", "forced", "differences", "run_id"}` (`forced`: settings
    differed and `force_resume` went on anyway), after comparing the checkpoint's settings with this run's; `None`
    for a new run. `settings` name the resolved model (`run_settings`)."""
    if resume_from is None:
        return None
    record = read_record(resume_from)
    if record is None or "settings" not in record:
        if not force_resume:
            raise UsageError(
                f"resume_from_checkpoint={resume_from} has no {RUN_RECORD} (it was not saved by trl-thr train), so "
                "its settings cannot be compared with this run's. Add --force_resume true to resume it anyway."
            )
        return {"checkpoint": str(resume_from), "settings": None, "forced": True, "differences": None}
    differences = setting_differences(record["settings"], settings)
    if differences and not force_resume:
        listed = "; ".join(f"{name} {_describe(old)} -> {_describe(new)}" for name, (old, new) in differences.items())
        raise UsageError(
            f"resume_from_checkpoint={resume_from} was trained with other settings ({listed}). Resume with the "
            "checkpoint's settings, or add --force_resume true to continue it under the new ones."
        )
    return {"checkpoint": str(resume_from), "settings": record["settings"], "forced": bool(differences),
            "differences": {name: list(pair) for name, pair in differences.items()} or None,
            "run_id": record.get("run_id")}


class RunRecord:
    """`trl_thr_run.json` of one run: written into every checkpoint it saves (through `callback()`) and, by the main
    process, into `output_dir` when it has finished."""

    def __init__(self, output_dir: str, settings: dict, resumed_from: dict | None, details: dict):
        self.output_dir = Path(output_dir)
        self.record = {"run_id": current_run_id(), "finished": False, "settings": settings,
                       "resumed_from": resumed_from, **details}

    def finish(self, global_step: int, **more) -> None:
        self.record.update(finished=True, global_step=global_step, **more)
        write_json_atomically(self.output_dir / RUN_RECORD, self.record, indent=2)

    def callback(self):
        """A `TrainerCallback` that copies the record, with the step, into every checkpoint the run saves."""
        from transformers import TrainerCallback

        record = self.record

        class CheckpointRecord(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                    write_json_atomically(checkpoint / RUN_RECORD, {**record, "global_step": state.global_step},
                                          indent=2)

        return CheckpointRecord()


def interrupted_message(output_dir: str, save_strategy: str, resume_from: str | None) -> str:
    """What an interrupted run kept: the last checkpoint it wrote itself (none of an earlier run's), or why none."""
    run_id = os.environ.get(RUN_ID_VARIABLE)
    own = [checkpoint for checkpoint in checkpoints_in(output_dir)
           if run_id is not None and (read_record(checkpoint) or {}).get("run_id") == run_id]
    if own:
        last = own[-1]
        return (f"the last checkpoint is {last}; add --resume_from_checkpoint {last} to the same command to resume "
                "from it.")
    if resume_from is not None:
        return (f"this run saved no checkpoint; it resumed from {resume_from}, so the same command resumes from "
                "there again.")
    return (f"this run saved no checkpoint in {output_dir} (save_strategy={save_strategy}), so it cannot resume; "
            "rerun the same command to start again.")
