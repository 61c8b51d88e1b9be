"""`trl_thr.cli.run_dir`: one output_dir, one run. What is refused before training, what each record holds, and what
an interrupted run names."""

import json
from types import SimpleNamespace

import pytest

from trl_thr.cli.errors import UsageError
from trl_thr.cli.run_dir import (
    RUN_ID_VARIABLE,
    RUN_RECORD,
    RunRecord,
    checkpoints_in,
    check_writable,
    interrupted_message,
    prepare_output_dir,
    setting_differences,
    start_run,
)

SETTINGS = {"script": {"dataset_name": "arithmetic"}, "model": {"model_name_or_path": "m"},
            "training": {"learning_rate": 1e-3, "seed": 0}, "thr": {"thr_strategy": "positive-amplify", "thr_p": 0.1}}


def other(**changes):
    settings = json.loads(json.dumps(SETTINGS))
    for name, value in changes.items():
        group = "thr" if name.startswith("thr_") else "training"
        settings[group][name] = value
    return settings


def checkpoint(output_dir, step, run_id="earlier", settings=SETTINGS):
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if run_id is not None:
        (path / RUN_RECORD).write_text(json.dumps({"run_id": run_id, "settings": settings, "global_step": step}))
    return path


def prepare(output_dir, resume_from=None, overwrite=False, force_resume=False, settings=SETTINGS):
    return prepare_output_dir(str(output_dir), settings, resume_from=None if resume_from is None else str(resume_from),
                              overwrite=overwrite, force_resume=force_resume)


@pytest.fixture
def run_id(monkeypatch):
    monkeypatch.delenv(RUN_ID_VARIABLE, raising=False)
    return start_run(launched=False)


def test_a_new_directory_is_created_and_starts_a_new_run(tmp_path):
    assert prepare(tmp_path / "a" / "run") is None
    assert (tmp_path / "a" / "run").is_dir() and list((tmp_path / "a" / "run").iterdir()) == []


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    for step in (10, 2, 100):
        checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-7").write_text("a file")
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-100"]


def test_another_runs_checkpoints_are_refused_with_the_three_ways_on(tmp_path):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 10)
    with pytest.raises(UsageError) as error:
        prepare(tmp_path)
    assert str(error.value) == (
        f"output_dir={tmp_path} holds checkpoints of an earlier run (2, the last checkpoint-10). Train into a new "
        f"output_dir, resume that run with --resume_from_checkpoint {tmp_path / 'checkpoint-10'}, or start over with "
        "--overwrite_output_dir true (deletes that run's model, checkpoints, record, thr_heatmaps/ and completions/)."
    )
    # resuming a checkpoint kept elsewhere does not make this directory's checkpoints this run's
    elsewhere = checkpoint(tmp_path / "elsewhere", 4)
    with pytest.raises(UsageError, match="holds checkpoints of an earlier run"):
        prepare(tmp_path, resume_from=elsewhere)


def test_overwrite_deletes_the_checkpoints_and_the_record_only(tmp_path):
    checkpoint(tmp_path, 2)
    (tmp_path / RUN_RECORD).write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "my_eval.json").write_text("{}")  # a user's own JSON: not the run's, whatever its suffix
    assert prepare(tmp_path, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_eval.json", "notes.txt"]
    with pytest.raises(UsageError, match="overwrite_output_dir=true starts a new run; it cannot be combined with "
                                         "resume_from_checkpoint"):
        prepare(tmp_path, overwrite=True, resume_from=checkpoint(tmp_path, 3))


def finished(output_dir, steps=12, model=True):
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_RECORD).write_text(json.dumps({"finished": True, "global_step": steps, "settings": SETTINGS}))
    if model:
        for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
            (output_dir / name).write_text("x")
    for directory in ("thr_heatmaps", "completions"):
        (output_dir / directory).mkdir()
        (output_dir / directory / "step_00001.html").write_text("old")


def test_a_finished_run_without_checkpoints_is_refused_and_overwrite_removes_its_files(tmp_path):
    finished(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError) as error:
        prepare(tmp_path)
    assert str(error.value) == (
        f"output_dir={tmp_path} holds a finished run of 12 steps (its model); training it again would train past its "
        "max_steps. Train into a new output_dir, or start over with --overwrite_output_dir true (deletes that run's "
        "model, checkpoints, record, thr_heatmaps/ and completions/)."
    )
    assert prepare(tmp_path, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the old run's artefacts are gone


def test_a_finished_run_with_checkpoints_is_not_offered_a_resume(tmp_path):
    finished(tmp_path)
    checkpoint(tmp_path, 12)
    with pytest.raises(UsageError, match=r"holds a finished run of 12 steps \(its model and 1 checkpoint\(s\)\); "
                                         "training it again would train past its max_steps") as error:
        prepare(tmp_path)
    assert "--resume_from_checkpoint" not in str(error.value)
    # a saved model without a record (another tool's run, or a record lost) is a finished run too
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "model.safetensors").write_text("x")
    with pytest.raises(UsageError, match="holds a finished run \\(its model\\)"):
        prepare(other_dir)


def test_resuming_in_place_spelt_relative_or_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    checkpoint(out, 2)
    last = checkpoint(out, 4, run_id="run-a")
    resumed = prepare_output_dir("run", SETTINGS, resume_from="run/checkpoint-4", overwrite=False,
                                 force_resume=False)
    assert resumed["checkpoint"] == "run/checkpoint-4" and resumed["run_id"] == "run-a"
    assert prepare_output_dir(str(out), SETTINGS, resume_from="./run/../run/checkpoint-4", overwrite=False,
                              force_resume=False)["run_id"] == "run-a"
    assert last.is_dir()


def test_settings_name_the_resolved_model(tmp_path, monkeypatch):
    """A local model recorded by an absolute path: the relative and absolute spellings of it compare equal."""
    from trl_thr.cli.run_dir import canonical_model, run_settings
    from trl_thr import THRGRPOConfig
    from trl import ModelConfig, ScriptArguments

    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    args = THRGRPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, report_to="none")
    relative = run_settings(ScriptArguments(dataset_name="d"), ModelConfig(model_name_or_path="model"), args)
    absolute = run_settings(ScriptArguments(dataset_name="d"), ModelConfig(model_name_or_path=str(tmp_path / "model")),
                            args)
    assert relative == absolute and relative["model"]["model_name_or_path"] == str((tmp_path / "model").resolve())
    assert canonical_model("Qwen/Qwen2.5-Math-1.5B") == "Qwen/Qwen2.5-Math-1.5B"  # a hub id stays as it is


def test_resuming_in_place_with_the_same_settings(tmp_path):
    checkpoint(tmp_path, 2)
    last = checkpoint(tmp_path, 4, run_id="run-a")
    assert prepare(tmp_path, resume_from=last) == {"checkpoint": str(last), "settings": SETTINGS, "forced": False,
                                                  "differences": None, "run_id": "run-a"}


def test_resuming_under_other_settings_is_refused_unless_forced(tmp_path):
    last = checkpoint(tmp_path, 4)
    changed = other(learning_rate=2e-3, thr_p=-0.1)
    with pytest.raises(UsageError) as error:
        prepare(tmp_path, resume_from=last, settings=changed)
    assert str(error.value) == (
        f"resume_from_checkpoint={last} was trained with other settings (thr_p 0.1 -> -0.1; learning_rate 0.001 -> "
        "0.002). Resume with the checkpoint's settings, or add --force_resume true to continue it under the new ones."
    )
    resumed = prepare(tmp_path, resume_from=last, settings=changed, force_resume=True)
    assert resumed["forced"] and resumed["differences"] == {"learning_rate": [1e-3, 2e-3], "thr_p": [0.1, -0.1]}


def test_a_checkpoint_without_a_record_is_resumed_only_when_forced(tmp_path):
    foreign = checkpoint(tmp_path, 3, run_id=None)
    with pytest.raises(UsageError, match=f"has no {RUN_RECORD} .* Add --force_resume true"):
        prepare(tmp_path, resume_from=foreign)
    assert prepare(tmp_path, resume_from=foreign, force_resume=True) == {
        "checkpoint": str(foreign), "settings": None, "forced": True, "differences": None}


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"resume_from_checkpoint=.*nowhere is not a directory"):
        prepare(tmp_path / "run", resume_from=tmp_path / "nowhere")


def test_setting_differences_see_added_and_removed_fields():
    assert setting_differences(SETTINGS, SETTINGS) == {}
    added = json.loads(json.dumps(SETTINGS))
    added["thr"]["thr_p_end"] = 0.0
    assert setting_differences(SETTINGS, added) == {"thr_p_end": (None, 0.0)}


def test_an_output_dir_below_a_file_cannot_be_written(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(UsageError) as error:
        check_writable(tmp_path / "afile" / "run")
    assert str(error.value) == (f"output_dir={tmp_path / 'afile' / 'run'} cannot be written: Not a directory "
                                f"({tmp_path / 'afile'} is a file). Choose a directory you can write to.")


def test_every_invocation_is_a_new_run_and_launched_processes_share_their_launchers(monkeypatch):
    monkeypatch.delenv(RUN_ID_VARIABLE, raising=False)
    first = start_run(launched=False)
    second = start_run(launched=False)
    assert first != second  # two runs in one Python process (a notebook) never share an id
    assert start_run(launched=True) == second  # a process `trl-thr train` launched inherits it
    monkeypatch.delenv(RUN_ID_VARIABLE)
    assert start_run(launched=True)  # launched by hand: its own id


def test_the_record_goes_into_every_checkpoint_and_into_output_dir_at_the_end(tmp_path, run_id):
    record = RunRecord(str(tmp_path), SETTINGS, None, {"model": "m"})
    (tmp_path / "checkpoint-3").mkdir()
    state = SimpleNamespace(is_world_process_zero=True, global_step=3)
    record.callback().on_save(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    saved = json.loads((tmp_path / "checkpoint-3" / RUN_RECORD).read_text())
    assert saved == {"run_id": run_id, "finished": False, "settings": SETTINGS, "resumed_from": None, "model": "m",
                     "global_step": 3}
    assert not (tmp_path / RUN_RECORD).exists()  # not finished: output_dir holds no model this record describes
    record.finish(5, seconds=1.5)
    final = json.loads((tmp_path / RUN_RECORD).read_text())
    assert final == {**saved, "finished": True, "global_step": 5, "seconds": 1.5}


def test_an_interruption_names_only_this_runs_checkpoints(tmp_path, run_id):
    checkpoint(tmp_path, 8, run_id="earlier")
    assert interrupted_message(str(tmp_path), "steps", None) == (
        f"this run saved no checkpoint in {tmp_path} (save_strategy=steps), so it cannot resume; rerun the same "
        "command to start again.")
    resumed_from = str(tmp_path / "checkpoint-8")
    assert interrupted_message(str(tmp_path), "steps", resumed_from) == (
        f"this run saved no checkpoint; it resumed from {resumed_from}, so the same command resumes from there again.")
    own = checkpoint(tmp_path, 10, run_id=run_id)
    checkpoint(tmp_path, 12, run_id="later")
    assert interrupted_message(str(tmp_path), "steps", resumed_from) == (
        f"the last checkpoint is {own}; add --resume_from_checkpoint {own} to the same command to resume from it.")
