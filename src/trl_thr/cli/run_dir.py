"""One output directory, one run: what `trl-thr train` checks in `output_dir` before training and records there.

- Before any model is loaded, `prepare_output_dir` checks that `output_dir` can be written, refuses a directory that
  holds checkpoints of another run (unless the run resumes one of them, or `overwrite_output_dir` deletes them), and
  refuses to resume a checkpoint trained with other settings (unless `force_resume`).
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


def run_settings(script_args, model_args, training_args) -> dict:
    """What a run trains: its data, template and rewards, its model settings, and its training and `thr_*` fields.
    JSON-ready (values JSON cannot hold are written as their `str`)."""
    training = training_args.to_dict()
    settings = {
        "script": {k: v for k, v in asdict(script_args).items() if k not in INVOCATION_FIELDS},
        "model": asdict(model_args),
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


def prepare_output_dir(output_dir: str, settings: dict, *, resume_from: str | None, overwrite: bool,
                       force_resume: bool) -> dict | None:
    """Check `output_dir` before training (see the module docstring); delete its checkpoints if `overwrite`.

    Returns what the run resumes from, `{"checkpoint", "settings", "forced", "differences"}`, or `None` for a new run.
    """
    check_writable(output_dir)
    existing = checkpoints_in(output_dir)
    if overwrite:
        if resume_from is not None:
            raise UsageError("overwrite_output_dir=true starts a new run; it cannot be combined with "
                             "resume_from_checkpoint. Drop one of them.")
        for checkpoint in existing:
            shutil.rmtree(checkpoint)
        (Path(output_dir) / RUN_RECORD).unlink(missing_ok=True)
        return None
    resumed_in_place = resume_from is not None and any(
        Path(resume_from).resolve() == checkpoint.resolve() for checkpoint in existing
    )
    if existing and not resumed_in_place:
        last = existing[-1]
        raise UsageError(
            f"output_dir={output_dir} holds checkpoints of an earlier run ({len(existing)}, the last {last.name}). "
            f"Train into a new output_dir, resume that run with --resume_from_checkpoint {last}, or start over with "
            "--overwrite_output_dir true (deletes those checkpoints)."
        )
    if resume_from is None:
        return None
    if not Path(resume_from).is_dir():
        raise UsageError(
            f"resume_from_checkpoint={resume_from} is not a directory (e.g. {output_dir}/checkpoint-500)."
        )
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
