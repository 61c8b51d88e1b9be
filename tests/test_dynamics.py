"""`trl-thr analyze --dynamics`: the paired one-step study (same start for every arm, the trainer's weights, plain
policy-gradient step, normalisation, summary statistics, dynamics.json, bad arguments)."""

import json
import math

import pytest
import torch

from trl_thr.cli.commands import analyze as analyze_script
from trl_thr.cli.analysis import build_batch
from trl_thr.cli.dynamics import (
    arm_config,
    arm_weights,
    batch_dynamics,
    batches_of_groups,
    mixed_groups,
    select_groups,
    summarize_dynamics,
    token_logps_and_entropy,
)
from trl_thr.cli.errors import UsageError

ARMS = ["grpo", "positive-amplify", "negative-amplify", "dominant-only"]


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def random_batch(vocab: int, groups=2, G=4, seed=0):
    """`groups` groups of G completions of random tokens, with mixed 0/1 rewards in every group."""
    generator = torch.Generator().manual_seed(seed)
    prompts, completions, rewards = [], [], []
    for group in range(groups):
        prompt = torch.randint(3, vocab, (3 + group,), generator=generator).tolist()
        for row in range(G):
            length = 2 + int(torch.randint(0, 4, (1,), generator=generator))
            prompts.append(prompt)
            completions.append(torch.randint(3, vocab, (length,), generator=generator).tolist())
            rewards.append(float(row % 2))
    return build_batch(prompts, completions, rewards, [r > 0 for r in rewards], G, pad_id=0)


def configs_for(arms, G=4, p=0.1):
    return {arm: arm_config(arm, p=p, num_generations=G) for arm in arms}


def parameters_vector(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_arms_start_from_the_same_weights_and_weights_are_restored(model):
    batch = random_batch(model.config.vocab_size)
    before = parameters_vector(model)
    first = batch_dynamics(model, batch, ARMS, configs_for(ARMS), lr=0.5)
    assert torch.equal(parameters_vector(model), before)
    # Reversed order: each arm's result does not depend on which arms ran before it.
    second = batch_dynamics(model, batch, ARMS[::-1], configs_for(ARMS), lr=0.5)
    for arm in ARMS:
        for metric, value in first[arm].items():
            assert second[arm][metric] == pytest.approx(value, rel=1e-5, abs=1e-7), (arm, metric)
    assert all(p.grad is None for p in model.parameters())


def test_grpo_arm_is_a_plain_policy_gradient_step(model):
    """With all weights 1 the arm's step equals SGD on -sum(A * logp) / N_tokens, computed directly."""
    batch = random_batch(model.config.vocab_size, seed=1)
    lr = 0.3
    result = batch_dynamics(model, batch, ["grpo"], configs_for(["grpo"]), lr=lr)
    assert result["grpo"]["mean_weight"] == 1.0

    reference = [p.detach().clone() for p in model.parameters()]
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    T = batch.completion_ids.size(1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][:, -T:]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    tokens = batch.completion_mask.float()
    loss = -(batch.advantages.unsqueeze(1) * logp * tokens).sum() / tokens.sum()
    gradients = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in gradients if g is not None))
    assert result["grpo"]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    with torch.no_grad():
        for parameter, gradient in zip(model.parameters(), gradients):
            if gradient is not None:
                parameter.add_(gradient, alpha=-lr)
        after, entropy_after = token_logps_and_entropy(model, batch)
        for parameter, initial in zip(model.parameters(), reference):
            parameter.copy_(initial)
        start, entropy_start = token_logps_and_entropy(model, batch)
    correct = batch.completion_mask.bool() & batch.correct.unsqueeze(1)
    expected = float(after[correct].mean() - start[correct].mean())
    assert result["grpo"]["dlogp_correct"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    mask_bool = batch.completion_mask.bool()
    expected_entropy = float(entropy_after[mask_bool].mean() - entropy_start[mask_bool].mean())
    assert result["grpo"]["dentropy"] == pytest.approx(expected_entropy, rel=1e-3, abs=5e-6)  # float32 sums
    # A policy-gradient step with positive advantages on correct completions raises their log-prob.
    assert result["grpo"]["dlogp_correct"] > 0 > result["grpo"]["dlogp_incorrect"]


def test_weights_are_the_trainers(model):
    """The arms' weights come from weights_from_config: amplify arms move dominant tokens by 1 +/- p."""
    batch = random_batch(model.config.vocab_size, seed=2)
    thr = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(0))
    thr = thr * batch.completion_mask
    weights = {arm: arm_weights(config, thr, batch) for arm, config in configs_for(ARMS, p=0.25).items()}
    mask = batch.completion_mask.bool()
    dominant = weights["dominant-only"].bool() & mask
    assert torch.equal(weights["grpo"], batch.completion_mask.float())
    sign = thr.sign()
    assert torch.allclose(weights["positive-amplify"][dominant], (1 + 0.25 * sign)[dominant])
    assert torch.allclose(weights["negative-amplify"][dominant], (1 - 0.25 * sign)[dominant])
    assert (weights["positive-amplify"][mask & ~dominant] == 0).all()


def test_normalize_gives_every_arm_grpos_step_norm(model):
    batch = random_batch(model.config.vocab_size, seed=3)
    result = batch_dynamics(model, batch, ARMS, configs_for(ARMS, p=0.5), lr=0.1, normalize=True)
    steps = [result[arm]["step_norm"] for arm in ARMS]
    assert steps == pytest.approx([0.1 * result["grpo"]["grad_norm"]] * len(ARMS), rel=1e-5)
    unnormalized = batch_dynamics(model, batch, ARMS, configs_for(ARMS, p=0.5), lr=0.1)
    assert len({round(unnormalized[arm]["step_norm"], 9) for arm in ARMS}) > 1  # it does change something


def test_normalize_without_grpo_arm_still_uses_grpos_norm(model):
    batch = random_batch(model.config.vocab_size, seed=3)
    both = batch_dynamics(model, batch, ["grpo", "dominant-only"], configs_for(ARMS), lr=0.1, normalize=True)
    alone = batch_dynamics(model, batch, ["dominant-only"], configs_for(ARMS), lr=0.1, normalize=True)
    assert alone["dominant-only"]["step_norm"] == pytest.approx(both["grpo"]["step_norm"], rel=1e-5)


def test_summary_statistics_by_hand():
    per_batch = [{"a": {"dlogp_correct": 1.0, "dlogp_incorrect": 0.0, "dentropy": 0.5, "mean_weight": 1.0,
                        "grad_norm": 2.0},
                  "b": {"dlogp_correct": 0.0, "dlogp_incorrect": 1.0, "dentropy": 0.5, "mean_weight": 0.5,
                        "grad_norm": 1.0}},
                 {"a": {"dlogp_correct": 3.0, "dlogp_incorrect": 0.0, "dentropy": 0.5, "mean_weight": 1.0,
                        "grad_norm": 4.0},
                  "b": {"dlogp_correct": 4.0, "dlogp_incorrect": 1.0, "dentropy": 0.5, "mean_weight": 0.5,
                        "grad_norm": 1.0}}]
    summary = summarize_dynamics(per_batch, ["a", "b"])
    assert summary["arms"]["a"]["dlogp_correct"] == {"mean": 2.0, "se": 1.0, "n": 2}
    assert summary["arms"]["b"]["mean_weight"] == {"mean": 0.5, "se": 0.0, "n": 2}
    pair = summary["pairs"]["a - b"]
    assert pair["dlogp_correct"] == {"mean": 0.0, "se": 1.0, "n": 2, "positive": 1, "negative": 1}
    assert pair["dlogp_incorrect"]["mean"] == -1.0 and pair["dlogp_incorrect"]["negative"] == 2
    assert pair["dentropy"]["positive"] == pair["dentropy"]["negative"] == 0


def test_group_selection_and_batching():
    batch = build_batch([[5], [5], [6], [6], [7, 8], [7, 8]], [[1], [2, 3], [4], [4], [5, 6, 7], [5]],
                        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [True, False, False, False, True, False], 2, pad_id=0)
    keep = mixed_groups(batch)
    assert keep.tolist() == [True, False, True]
    parts = batches_of_groups(select_groups(batch, keep), 1)
    assert len(parts) == 2
    assert parts[0].prompt_ids.tolist() == [[5], [5]]  # left padding of the wider prompts trimmed
    assert parts[0].completion_ids.size(1) == 2 and parts[1].completion_ids.size(1) == 3


def test_analyze_dynamics_end_to_end(tiny_model_path, tmp_path):
    argv = ["--model_name_or_path", tiny_model_path, "--dataset_name", "arithmetic", "--num_samples", "8",
            "--num_prompts", "4", "--num_generations", "4", "--max_new_tokens", "16", "--prompt_template",
            "chat-boxed", "--output_dir", str(tmp_path), "--reward_funcs", "trl_thr.tiny:digit_reward",
            "--dynamics", "true", "--dynamics_lr", "0.05", "--dynamics_p", "0.2", "--dynamics_batches", "2"]
    record = analyze_script.main(argv)
    saved = json.loads((tmp_path / "dynamics.json").read_text())
    assert set(saved) >= {"arms", "pairs", "batches", "config"}
    assert list(saved["arms"]) == ARMS and 1 <= saved["batches"] <= 2
    for arm in ARMS:
        assert set(saved["arms"][arm]) >= {"dlogp_correct", "dlogp_incorrect", "dentropy", "mean_weight",
                                           "grad_norm"}
        assert set(saved["arms"][arm]["dlogp_correct"]) >= {"mean", "se"}
    assert len(saved["pairs"]) == 6 and "grpo - positive-amplify" in saved["pairs"]
    assert set(saved["pairs"]["grpo - positive-amplify"]["dentropy"]) >= {"mean", "se", "positive", "negative"}
    assert saved["config"]["p"] == 0.2 and saved["config"]["reward_funcs"] == ["trl_thr.tiny:digit_reward"]
    assert saved["arms"]["grpo"]["mean_weight"]["mean"] == 1.0
    assert record["dynamics"]["batches"] == saved["batches"]
    assert (tmp_path / "dynamics.png").stat().st_size > 5_000
    page = (tmp_path / "thr_report.html").read_text()
    assert "One-step dynamics per arm" in page and "class='dynamics'" in page


BASE = ["--model_name_or_path", "m", "--dataset_name", "arithmetic", "--dynamics", "true"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--dynamics_arms", "grpo", "bogus"], r"dynamics_arms \['bogus'\] not understood"),
        (["--dynamics_arms", "none"], r"dynamics_arms \['none'\] not understood.*grpo is"),
        (["--dynamics_arms", "grpo", "grpo"], "lists an arm twice"),
        (["--dynamics_p", "1.5"], r"dynamics_p=1.5: \|p\| must be < 1"),
        (["--dynamics_lr", "0"], "dynamics_lr must be > 0"),
        (["--dynamics_groups_per_batch", "0"], "dynamics_groups_per_batch must be >= 1"),
        (["--dynamics_batches", "0"], "dynamics_batches must be >= 1"),
        (["--thr_threshold", "quantile"], r"thr_threshold='quantile' needs thr_quantile"),
        (["--thr_threshold", "absolute"], "thr_threshold='absolute' needs thr_tau"),
        (["--reward_funcs", "accuracy", "--reward_weights", "1", "2"], "reward_weights has 2 values"),
    ],
)
def test_dynamics_usage_errors(extra, message):
    with pytest.raises(UsageError, match=message) as error:
        analyze_script.main(BASE + extra)
    assert "\n" not in str(error.value)


def test_bad_reward_func_is_a_usage_error(tiny_model_path, tmp_path):
    with pytest.raises(UsageError, match="no_such_module"):
        analyze_script.main(["--model_name_or_path", tiny_model_path, "--dataset_name", "arithmetic",
                             "--num_samples", "4", "--num_prompts", "1", "--num_generations", "2",
                             "--max_new_tokens", "4", "--output_dir", str(tmp_path),
                             "--reward_funcs", "no_such_module:f"])
