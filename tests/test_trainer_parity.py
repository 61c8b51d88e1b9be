"""THR that changes nothing is GRPO, and TRL's features keep working with THR on.

`thr_strategy="none"`, and `dominant-only` with `thr_threshold="none"` (weights of exactly 1), give GRPOTrainer's loss
and gradients bit for bit on a fixed batch, and end whole runs bit for bit where GRPOTrainer ends: same seed, same
data, several optimizer steps with completions reused across steps (`steps_per_generation=2`), every loss type the
installed TRL has. Token weights reach every TRL loss type and GSPO-token, the weights of each micro-batch are those
of its own rows, and PEFT, TRL's batch layouts, evaluation and resuming from a checkpoint train with THR on.
"""

import math
import re
from unittest.mock import patch

import pytest
import torch
from helpers import CPU, binary_reward, length_reward, tiny_dataset
from trainers import changed, loss_and_grads, make_config, snapshot
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_thr import THRGRPOConfig, THRGRPOTrainer, compute_thr, group_thresholds, thr_weights


def fixed_inputs(model_path, batch=4, length=6, seed=0):
    """A generation-batch-like dict with old log-probs off the current ones, so ratios differ from 1."""
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (batch, 5), generator=gen)
    prompt_mask = torch.ones(batch, 5, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(3, vocab, (batch, length), generator=gen)
    completion_mask = torch.ones(batch, length, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, completion_ids], 1)).logits[:, 4:-1]
        logps = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.4, 0.7, -1.5]),
        "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": logps + 0.15 * torch.randn(batch, length, generator=gen),
        "ref_per_token_logps": logps - 0.1,
    }


def build(trainer_cls, config_cls, model_path, tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, beta=0.05, **CPU)
    kwargs.update(overrides)
    return trainer_cls(model=model_path, reward_funcs=length_reward, args=config_cls(**kwargs),
                       train_dataset=tiny_dataset())


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"])
def test_no_thr_is_exactly_grpo(loss_type, level, tiny_model_path, tmp_path):
    inputs = fixed_inputs(tiny_model_path)
    common = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.25)
    base = build(GRPOTrainer, GRPOConfig, tiny_model_path, tmp_path, **common)
    expected_loss, expected_grads = loss_and_grads(base, inputs)

    none = build(THRGRPOTrainer, THRGRPOConfig, tiny_model_path, tmp_path, thr_strategy="none", **common)
    unit = build(THRGRPOTrainer, THRGRPOConfig, tiny_model_path, tmp_path, thr_strategy="dominant-only",
                 thr_threshold="none", **common)
    # dominant-only with no threshold gives weight exactly 1 on every token: (B, T) advantages equal to (B,) ones.
    thr = torch.randn(4, 6)
    taus = group_thresholds(thr, inputs["advantages"], inputs["completion_mask"], 4, threshold="none")
    ones = thr_weights(thr, inputs["advantages"], inputs["completion_mask"], 4, strategy="dominant-only", taus=taus)
    assert torch.equal(ones, inputs["completion_mask"].float())
    for trainer, extra in ((none, {}), (unit, {"thr_weights": torch.ones(4, 6)})):
        loss, grads = loss_and_grads(trainer, {**inputs, **extra})
        assert torch.equal(loss, expected_loss)
        assert grads.keys() == expected_grads.keys()
        for name in grads:
            if extra and level == "sequence":
                # A (B, 1) sequence ratio times (B, T) instead of (B, 1) advantages: the same values, but backward
                # sums the broadcast in another order, so gradients agree to float32 round-off only.
                torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-8)
            else:
                assert torch.equal(grads[name], expected_grads[name]), name


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo", "vespo", "cispo", "sapo"])
def test_token_weights_reach_every_loss_type(loss_type, tiny_model_path, tmp_path):
    """Every TRL loss takes (B, T) advantages: non-uniform weights change the gradient, uniform c scales it."""
    inputs = fixed_inputs(tiny_model_path)
    trainer = build(THRGRPOTrainer, THRGRPOConfig, tiny_model_path, tmp_path, loss_type=loss_type, beta=0.0)
    _, plain = loss_and_grads(trainer, inputs)
    weights = torch.linspace(0.5, 1.5, 6).expand(4, 6).contiguous()
    _, weighted = loss_and_grads(trainer, {**inputs, "thr_weights": weights})
    assert any(not torch.allclose(plain[n], weighted[n]) for n in plain)
    assert all(torch.isfinite(g).all() for g in weighted.values())


def test_sequence_token_keeps_token_weights_and_sequence_only_sees_their_sum(tiny_model_path, tmp_path):
    inputs = fixed_inputs(tiny_model_path)
    inputs["completion_mask"] = torch.ones(4, 6, dtype=torch.long)
    # Same row sums, different per-token profiles.
    w1 = torch.tensor([[1.1, 0.9, 1.1, 0.9, 1.0, 1.0]]).expand(4, 6).contiguous()
    w2 = torch.tensor([[0.9, 1.1, 0.9, 1.1, 1.0, 1.0]]).expand(4, 6).contiguous()
    grads = {}
    for level in ("sequence", "sequence_token"):
        trainer = build(THRGRPOTrainer, THRGRPOConfig, tiny_model_path, tmp_path, loss_type="grpo", beta=0.0,
                        importance_sampling_level=level, epsilon=10.0)  # no clipping: isolate the weights
        grads[level] = [loss_and_grads(trainer, {**inputs, "thr_weights": w})[1] for w in (w1, w2)]
    seq1, seq2 = grads["sequence"]
    assert all(torch.allclose(seq1[n], seq2[n], atol=1e-7) for n in seq1)
    tok1, tok2 = grads["sequence_token"]
    assert any(not torch.allclose(tok1[n], tok2[n], atol=1e-6) for n in tok1)


def test_sequence_token_loss_value_equals_sequence_loss(tiny_model_path, tmp_path):
    """GSPO-token keeps GSPO's value (the sequence ratio); only the gradient becomes per token."""
    inputs = fixed_inputs(tiny_model_path)
    losses = {}
    for level in ("sequence", "sequence_token"):
        trainer = build(THRGRPOTrainer, THRGRPOConfig, tiny_model_path, tmp_path, loss_type="grpo",
                        importance_sampling_level=level, thr_strategy="none")
        losses[level] = loss_and_grads(trainer, inputs)[0]
    torch.testing.assert_close(losses["sequence_token"], losses["sequence"])


# ---- whole runs ------------------------------------------------------------------------------------------------


def trl_loss_types():
    """The loss types GRPOConfig documents in its `loss_type` help (trl 1.14 and 1.16: 8, incl. luspo and vespo)."""
    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = re.search(r"Supported values are (.*?)\. ", help_text).group(1)
    return re.findall(r"'(\w+)'", listed)


LOSS_TYPES = trl_loss_types()


# The importance-sampling level each loss type needs (TRL rejects luspo at token level and vespo at sequence level).
LEVEL = {"luspo": "sequence"}


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


# ---- TRL's features with THR on ---------------------------------------------------------------------------------


class Recorder:
    """Wraps a method and keeps a copy of the inputs of its calls."""

    def __init__(self, cls, name):
        self.calls, self.original = [], getattr(cls, name)
        recorder = self

        def wrapper(trainer, model, inputs):
            recorder.calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
            return recorder.original(trainer, model, inputs)

        self.patch = patch.object(cls, name, wrapper)


def test_weights_in_loss_match_a_direct_recomputation(tiny_model_path, tmp_path):
    """No row mix-up: the weights each shuffled micro-batch carries are THR of its own rows, recomputed here."""
    args = make_config(tmp_path, max_steps=1, gradient_accumulation_steps=2, thr_threshold="none",
                       thr_strategy="positive-amplify", thr_p=0.3)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset())
    thr_calls, grpo_calls = Recorder(THRGRPOTrainer, "_compute_loss"), Recorder(GRPOTrainer, "_compute_loss")
    with thr_calls.patch, grpo_calls.patch:
        trainer.train()
    assert len(thr_calls.calls) == 2  # one generation batch of 8 rows, split into 2 shuffled micro-batches
    batch = {k: torch.cat([c[k] for c in thr_calls.calls]) for k in
             ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "thr_weights")}
    for seen, sent in zip(grpo_calls.calls, thr_calls.calls):
        torch.testing.assert_close(seen["advantages"], sent["advantages"][:, None] * sent["thr_weights"])

    # Regroup the rows by prompt (each prompt is one group), then recompute from the initial model.
    prompts = [tuple(row[mask.bool()].tolist()) for row, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    assert len(set(prompts)) == 2 and all(prompts[order[0]] == prompts[i] for i in order[:4])
    batch = {k: v[order] for k, v in batch.items()}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    length = batch["completion_ids"].size(1)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -length:]
    thr = compute_thr(hidden, batch["completion_ids"], batch["completion_mask"], model.lm_head.weight,
                      batch["advantages"], 4)
    taus = group_thresholds(thr, batch["advantages"], batch["completion_mask"], 4, threshold="none")
    expected = thr_weights(thr, batch["advantages"], batch["completion_mask"], 4, strategy="positive-amplify",
                           p=0.3, taus=taus)
    torch.testing.assert_close(batch["thr_weights"], expected)
    assert (expected != batch["completion_mask"]).any(), "weights are trivial: the check would not see a mix-up"


def test_peft_lora_with_kl(tiny_model_path, tmp_path):
    from peft import LoraConfig

    args = make_config(tmp_path, beta=0.1)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset(),
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = snapshot(trainer.model)
    trainer.train()
    moved = changed(before, trainer.model)
    assert moved and all("lora" in name for name in moved)
    assert "kl" in trainer.state.log_history[0] and "thr/kept_frac" in trainer.state.log_history[0]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_iterations=2),
        dict(gradient_accumulation_steps=2, per_device_train_batch_size=2),
        dict(steps_per_generation=2, per_device_train_batch_size=2, loss_type="grpo"),
        dict(beta=0.04, importance_sampling_level="sequence_token", loss_type="grpo"),
        dict(thr_threshold="quantile", thr_quantile=0.3, thr_quantile_scope="batch", thr_vocab="full"),
        dict(thr_strategy="amplify", thr_p=-0.2, thr_p_end=0.2, thr_p_schedule="cosine", max_steps=3),
        dict(thr_include_self=False, thr_positive_reward_threshold=1.0, thr_positive_reward_func="binary_reward"),
    ],
    ids=["num_iterations", "grad_accum", "steps_per_generation", "kl_gspo_token", "quantile_full", "schedule",
         "reward_threshold"],
)
def test_training_variants(overrides, tiny_model_path, tmp_path):
    args = make_config(tmp_path, **overrides)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=[length_reward, binary_reward], args=args,
                             train_dataset=tiny_dataset())
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    assert "thr/mean_weight" in logs[0]  # logged on steps that generate (every num_iterations steps)


def test_eval_dataset(tiny_model_path, tmp_path):
    args = make_config(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4,
                       num_generations_eval=2)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset(), eval_dataset=tiny_dataset(4))
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evals and "eval_thr/mean_weight" in evals[-1] and math.isfinite(evals[-1]["eval_loss"])


def test_schedule_resumes_where_it_stopped(tiny_model_path, tmp_path):
    common = dict(thr_strategy="amplify", thr_p=-0.3, thr_p_end=0.3, thr_p_schedule="linear", max_steps=4,
                  save_strategy="steps", save_steps=2)

    def p_by_step(trainer):
        return {entry["step"]: entry["thr/p"] for entry in trainer.state.log_history if "thr/p" in entry}

    full = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward,
                          args=make_config(tmp_path / "full", **common), train_dataset=tiny_dataset())
    full.train()

    class StopAfterTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    first = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward,
                           args=make_config(tmp_path / "cut", **common), train_dataset=tiny_dataset(),
                           callbacks=[StopAfterTwo()])
    first.train()
    assert first.state.global_step == 2
    resumed = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward,
                             args=make_config(tmp_path / "cut", **common), train_dataset=tiny_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    expected = p_by_step(full)
    # Progress global_step / (max_steps - 1): the first optimizer step uses thr_p and the last one thr_p_end.
    assert expected == pytest.approx({1: -0.3, 2: -0.1, 3: 0.1, 4: 0.3})
    assert sorted(p_by_step(first)) == [1, 2]
    assert p_by_step(resumed) == pytest.approx(expected)  # the restored history holds steps 1-2, the resume 3-4
