"""Every committed recipe rehearsed with its own settings, shrunk only in scale (tests/recipes.py says what changes):
a recipe that cannot start fails here, not on a user's GPUs. The vLLM-colocate rehearsals are in real_vllm/."""

import pytest
import yaml
from recipes import ROOT, STEPS, STUDY_RECIPES, TRAIN_RECIPES, shrink_study, shrink_train

from trl_thr.cli import main as cli_main
from trl_thr.cli.run_dir import finished_run


def name(path):
    return str(path.relative_to(ROOT))


def test_the_recipes_are_found():
    assert {path.name for path in TRAIN_RECIPES} == {"gspo_token.yaml", "lora.yaml", "multi_gpu_zero3.yaml",
                                                     "paper_qwen2.5_math_1.5b.yaml"}
    assert len(STUDY_RECIPES) >= 5


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=name)
def test_a_training_recipe_trains_as_committed_at_a_cpus_scale(recipe, tmp_path):
    shrunk = shrink_train(yaml.safe_load(recipe.read_text()), tmp_path, tmp_path / "out", vllm=False)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(shrunk))
    assert cli_main(["train", "--config", str(path)]) == 0
    assert finished_run(tmp_path / "out") == {"steps": STEPS}


@pytest.mark.parametrize("recipe", STUDY_RECIPES, ids=name)
def test_a_study_recipe_prepares_trains_and_evaluates_as_committed_at_a_cpus_scale(recipe, tmp_path):
    """Its preparation (if any), one run of the arm that sets the most fields, as the study configures it, and that
    run's evaluation on the first evaluation set (every set's config is checked by test_study.py)."""
    from trl_thr.cli.commands.study import build_parser, build_study
    from trl_thr.cli.study import eval_config, run_train_config, with_recipe_outputs
    from trl_thr.cli.study_units import execute_prepare

    config = shrink_study(recipe, tmp_path)
    root = tmp_path / "study"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    args, rest = build_parser().parse_known_args(["--config", str(path), "--output_dir", str(root)])
    study = with_recipe_outputs(build_study(args, rest), root)
    if study.prepare is not None:
        execute_prepare(study, root)
    arm = max(study.arms, key=lambda arm: len(arm.overrides))
    run_dir = root / "runs" / "rehearsal"
    shrunk = shrink_train(run_train_config(study, arm, 0, run_dir), tmp_path, run_dir / "model", vllm=False,
                          study_run=True)
    train = run_dir / "train.yaml"
    train.parent.mkdir(parents=True)
    train.write_text(yaml.safe_dump(shrunk))
    assert cli_main(["train", "--config", str(train)]) == 0
    assert finished_run(run_dir / "model") == {"steps": STEPS}
    for eval_set in list(study.evals)[:1]:
        settings = eval_config(study, eval_set, str(run_dir / "model"), run_dir / "eval" / eval_set, "rehearsal")
        evaluation = run_dir / f"eval-{eval_set or 'main'}.yaml"
        evaluation.write_text(yaml.safe_dump(settings))
        assert cli_main(["eval", "--config", str(evaluation)]) == 0, eval_set
        assert (run_dir / "eval" / eval_set / "rehearsal.json").exists()
