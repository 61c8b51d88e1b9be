"""Whole runs: THRGRPOTrainer with weights that change nothing ends bit-for-bit where GRPOTrainer ends.

Same seed, same data, several optimizer steps with completions reused across steps (`steps_per_generation=2`),
every loss type the installed TRL has. `thr_strategy="none"` must not touch anything; `dominant-only` with
`thr_threshold="none"` computes THR and multiplies every advantage by exactly 1, so nothing else it does (its
old-policy forward, its hooks) may change a single bit either.
"""

import re

import pytest
import torch
from tiny import length_reward, tiny_dataset
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from trl_thr import THRGRPOConfig, THRGRPOTrainer


def trl_loss_types():
    """The loss types GRPOConfig documents in its `loss_type` help (trl 1.16: 8, incl. luspo and vespo)."""
    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = re.search(r"Supported values are (.*?)\. ", help_text).group(1)
    return re.findall(r"'(\w+)'", listed)


LOSS_TYPES = trl_loss_types()
# The importance-sampling level each loss type needs (TRL rejects luspo at token level and vespo at sequence level).
LEVEL = {"luspo": "sequence"}
CPU = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no")


def test_every_documented_loss_type_is_covered():
    assert {"grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"} <= set(LOSS_TYPES)


# Two batch layouts: one generation per optimizer step, where TRL runs no old-policy forward and THR adds one; and
# one generation reused for two optimizer steps, where TRL runs that forward and THR reads its hidden states.
LAYOUTS = {
    "generate-every-step": dict(gradient_accumulation_steps=2, steps_per_generation=2),
    "reuse-for-two-steps": dict(gradient_accumulation_steps=1, steps_per_generation=2),
}


def final_parameters(trainer_cls, config_cls, model_path, output_dir, loss_type, layout, **thr):
    args = config_cls(
        output_dir=str(output_dir), loss_type=loss_type, importance_sampling_level=LEVEL.get(loss_type, "token"),
        per_device_train_batch_size=4, num_generations=4, **LAYOUTS[layout], max_completion_length=6, max_steps=2,
        learning_rate=0.05, beta=0.05, seed=0, logging_steps=1, **CPU, **thr,
    )
    trainer = trainer_cls(model=model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())
    trainer.train()
    assert trainer.state.global_step == 2
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_whole_run_with_unit_weights_is_grpo(loss_type, layout, tiny_model_path, tmp_path):
    grpo = final_parameters(GRPOTrainer, GRPOConfig, tiny_model_path, tmp_path / "grpo", loss_type, layout)
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_path).named_parameters())
    assert any(not torch.equal(grpo[n], start[n]) for n in grpo), "the run did not move: the comparison is empty"
    runs = {
        "none": final_parameters(THRGRPOTrainer, THRGRPOConfig, tiny_model_path, tmp_path / "none", loss_type,
                                 layout, thr_strategy="none"),
        "all-ones": final_parameters(THRGRPOTrainer, THRGRPOConfig, tiny_model_path, tmp_path / "ones", loss_type,
                                     layout, thr_strategy="dominant-only", thr_threshold="none"),
    }
    for run, params in runs.items():
        differ = [name for name in grpo if not torch.equal(grpo[name], params[name])]
        assert not differ, f"{run}: {len(differ)} parameters differ from GRPOTrainer's, e.g. {differ[:3]}"
