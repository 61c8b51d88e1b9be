"""Where THR's hidden states come from (`thr_hidden_source`): states recorded during `generate` give the THR of a
teacher-forced forward, the plain generate path runs no full-sequence forward beyond GRPOTrainer's, THR's own forward
runs only when TRL runs none and never feeds TRL's ratio, and under PEFT the states are the adapted policy's."""

from unittest.mock import patch

import pytest
import torch
from helpers import CPU, length_reward, tiny_dataset
from trainers import count_generation_forwards, full_sequence_forwards, make_config
from trl import GRPOConfig, GRPOTrainer

import trl_thr.thr_grpo_trainer as thr_grpo_trainer
from trl_thr import THRGRPOConfig, THRGRPOTrainer
from trl_thr._trl_compat import trl_computes_old_logps


def common(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=8, max_steps=2, logging_steps=1, learning_rate=0.1, seed=0,
                  temperature=0.7, **CPU)
    kwargs.update(overrides)
    return kwargs


def thr_of_one_batch(model_path, tmp_path, source):
    # A bias towards EOS (token 2) when sampling makes completions ragged; the recorded logits are the model's own.
    args = THRGRPOConfig(**common(tmp_path / source, thr_hidden_source=source, thr_strategy="amplify", thr_p=0.3,
                                  thr_threshold="none", generation_kwargs={"sequence_bias": [[[2], 2.5]]}))
    trainer = THRGRPOTrainer(model=model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())
    seen = {}
    original = thr_grpo_trainer.compute_thr

    def recording(*args, **kwargs):
        seen["thr"] = original(*args, **kwargs)
        return seen["thr"]

    torch.manual_seed(1)
    with patch.object(thr_grpo_trainer, "compute_thr", recording):
        batch = trainer._generate_and_score_completions(list(tiny_dataset())[:2] * 4)
    return batch, seen["thr"]


def with_biased_head(model_path):
    """The tiny model with an LM head that has a bias (as Phi's has), large enough to change which token wins."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.randn(head.out_features, generator=torch.Generator().manual_seed(0)) * 2.0)
        biased.bias[2] = biased.bias.max() - 2.0  # EOS stays likely, so the completions stay ragged
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(biased)
    return model


@pytest.mark.parametrize("head", ["plain", "biased"])
def test_recorded_states_give_the_forwards_thr(head, tiny_model_path, tmp_path):
    def model():
        return tiny_model_path if head == "plain" else with_biased_head(tiny_model_path)

    recorded, thr_recorded = thr_of_one_batch(model(), tmp_path, "generate")
    forward, thr_forward = thr_of_one_batch(model(), tmp_path, "forward")
    assert torch.equal(recorded["completion_ids"], forward["completion_ids"])  # same samples: a fair comparison
    mask = recorded["completion_mask"].bool()
    assert not mask.all(), "some completions should stop at EOS before the limit"
    assert (thr_forward[mask] != 0).any()
    torch.testing.assert_close(thr_recorded, thr_forward, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recorded["thr_weights"], forward["thr_weights"])


def test_no_forward_beyond_grpos_on_the_generate_path(tiny_model_path, tmp_path):
    beta = 0.05  # the reference forward runs too: counted, and not mistaken for the old policy's
    grpo = GRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, train_dataset=tiny_dataset(),
                       args=GRPOConfig(**common(tmp_path / "grpo", beta=beta)))
    expected = full_sequence_forwards(grpo)
    assert expected >= 2  # one training forward per step, plus the reference's with KL
    for source, extra in (("auto", 0), ("forward", 2)):
        args = THRGRPOConfig(**common(tmp_path / source, beta=beta, thr_hidden_source=source))
        thr = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset())
        assert full_sequence_forwards(thr) == expected + extra, source


def test_generate_source_refuses_what_it_cannot_record(tiny_model_path, tmp_path):
    args = THRGRPOConfig(**common(tmp_path, thr_hidden_source="generate"))
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset())
    trainer.rollout_func = lambda *args, **kwargs: None  # a custom rollout generates outside `generate`
    with pytest.raises(ValueError, match="thr_hidden_source='generate' cannot record .* rollout_func"):
        trainer._generate_and_score_completions(list(tiny_dataset())[:1] * 4)


def test_auto_falls_back_when_the_records_do_not_match(tiny_model_path, tmp_path):
    args = THRGRPOConfig(**common(tmp_path))
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset())
    # Records of another generate call (an empty recording) cannot be aligned: THR runs its forward instead.
    with patch.object(THRGRPOTrainer, "_generate_single_turn", GRPOTrainer._generate_single_turn):
        batch = trainer._generate_and_score_completions(list(tiny_dataset())[:1] * 4)
    mode = "train" if trainer.model.training else "eval"
    assert trainer._metrics[mode]["thr/own_forward"] == [1.0]
    assert batch["thr_weights"].shape == batch["completion_ids"].shape


@pytest.mark.parametrize("source,forwards", [("auto", 0), ("generate", 0), ("forward", 1)])
def test_old_policy_forwards_when_trl_runs_none(source, forwards, tiny_model_path, tmp_path):
    args = make_config(tmp_path, per_device_train_batch_size=4, num_generations=2, thr_hidden_source=source)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset())
    assert not trl_computes_old_logps(trainer)
    calls, batch = count_generation_forwards(trainer)
    assert calls == forwards  # recorded during generate: no forward at all
    mode = "train" if trainer.model.training else "eval"
    assert trainer._metrics[mode]["thr/own_forward"] == [float(forwards)]
    # THR's forward feeds THR only: TRL's ratio stays its on-policy ratio of exactly 1.
    assert "thr_weights" in batch and "old_per_token_logps" not in batch


def test_dropout_keeps_trls_on_policy_ratio(tiny_model_path, tmp_path):
    """With dropout on, a separate forward's log-probs would put mask noise into the PPO ratio: THR's forward feeds
    THR only and TRL keeps its ratio of exactly 1."""
    from peft import LoraConfig

    args = make_config(tmp_path, per_device_train_batch_size=4, num_generations=2)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset(),
                             peft_config=LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.3))
    trainer.args.thr_hidden_source = "forward"
    calls, batch = count_generation_forwards(trainer)
    assert calls == 1
    assert "old_per_token_logps" not in batch and batch["thr_weights"].shape == batch["completion_ids"].shape


def test_reuses_trls_forward_when_it_runs_one(tiny_model_path, tmp_path):
    args = make_config(tmp_path, per_device_train_batch_size=4, num_generations=2, num_iterations=2)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset())
    assert trl_computes_old_logps(trainer)
    calls, batch = count_generation_forwards(trainer)
    assert calls == 1
    assert batch["thr_weights"].shape == batch["completion_ids"].shape


def test_peft_captures_the_adapted_policy_not_the_reference(tiny_model_path, tmp_path):
    """With a trained adapter, THR's hidden states must be the policy's (adapter on), not the reference's."""
    from peft import LoraConfig

    args = make_config(tmp_path, beta=0.1, num_iterations=2)  # TRL runs old-logps, then reference, on self.model
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset(),
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    captured = []
    original = trainer._compute_thr

    def capture(batch, hidden, *more):
        captured.append(hidden)
        return original(batch, hidden, *more)

    trainer._compute_thr = capture
    batch = trainer._generate_and_score_completions(list(tiny_dataset())[:2] * 2)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    length = batch["completion_ids"].size(1)
    backbone = trainer.model.get_base_model().model
    with torch.no_grad():
        adapted = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -length:]
        with trainer.model.disable_adapter():
            reference = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -length:]
    assert not torch.allclose(adapted, reference)
    torch.testing.assert_close(captured[0], adapted, rtol=1e-5, atol=1e-5)
