"""The committed recipes that generate with vLLM in colocate mode, rehearsed with it: shrunk only in scale
(tests/recipes.py), vLLM's CPU engine in the recipe's own dtype, precision, loss and LoRA settings."""

import pytest
import yaml
from recipes import ROOT, STEPS, TRAIN_RECIPES, shrink_train

from trl_thr.cli import main as cli_main
from trl_thr.cli.run_dir import finished_run

COLOCATE = [path for path in TRAIN_RECIPES if (config := yaml.safe_load(path.read_text())).get("use_vllm")
            and config.get("vllm_mode", "colocate") == "colocate"]


def test_the_colocate_recipes_are_found():
    assert {path.name for path in COLOCATE} >= {"paper_qwen2.5_math_1.5b.yaml", "gspo_token.yaml", "lora.yaml"}


@pytest.mark.parametrize("recipe", COLOCATE, ids=lambda path: str(path.relative_to(ROOT)))
def test_a_vllm_recipe_trains_as_committed_at_a_cpus_scale(recipe, tmp_path):
    shrunk = shrink_train(yaml.safe_load(recipe.read_text()), tmp_path, tmp_path / "out", vllm=True)
    assert shrunk["use_vllm"] and shrunk["vllm_mode"] == "colocate"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(shrunk))
    assert cli_main(["train", "--config", str(path)]) == 0
    assert finished_run(tmp_path / "out") == {"steps": STEPS}
