"""What the trainer does with THR, pinned by values: each strategy trains and the signs of its weights, the
reward-threshold positive set, the logged metrics (one process and two), how a weight acts on the gradient (float64,
exact), what reaches the kernel, and the errors it raises."""

import math

import pytest
import torch
from helpers import CPU, WORKERS, launch_two_processes, length_reward, tiny_dataset
from ragged import LENGTHS, NUM_GENERATIONS, TEMPERATURE, length_of_completion, ragged_trainer, two_prompts
from thr_reference import per_token_gradients, reference_thr
from trainers import KernelRecorder, changed, loss_and_grads, make_config, snapshot
from transformers import AutoModelForCausalLM
from trl import GRPOConfig

from trl_thr import THRGRPOConfig, THRGRPOTrainer, compute_thr
from trl_thr.thr_grpo_trainer import THRBatch

THR_KEYS = ["thr/kept_frac", "thr/pos_frac", "thr/neg_frac", "thr/mean_weight", "thr/tau", "thr/abs_mean",
            "thr/groups_skipped_frac", "thr/p", "thr/seconds", "thr/forward_seconds"]


@pytest.mark.parametrize("strategy", ["positive-amplify", "negative-amplify", "dominant-only", "nthr", "none"])
def test_each_strategy_trains(strategy, tiny_model_path, tmp_path):
    threshold = "none" if strategy == "nthr" else "anchor"  # NTHR's eta is 0 when half the group is positive
    args = make_config(tmp_path, thr_strategy=strategy, thr_threshold=threshold)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset())
    before = snapshot(trainer.model)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert changed(before, trainer.model), "no parameter moved"
    if strategy == "none":
        assert not any(key.startswith("thr/") for entry in logs for key in entry)
    else:
        uses_p = strategy in ("positive-amplify", "negative-amplify")
        for key in THR_KEYS:
            assert (key in logs[-1]) == (uses_p or key != "thr/p"), key
        assert 0 <= logs[-1]["thr/kept_frac"] <= 1


def equal_reward(completions, **kwargs):
    return [1.0] * len(completions)


def no_signal_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "trl_thr.thr_grpo_trainer"
            and r.getMessage().startswith("No learning signal")]


@pytest.mark.parametrize("strategy", ["none", "positive-amplify"])
def test_batches_without_learning_signal_are_logged_and_warned_with_their_cause(strategy, tiny_model_path, tmp_path,
                                                                              caplog):
    from trl_thr.thr_grpo_trainer import NO_SIGNAL_WARNING_EVERY

    caplog.set_level("WARNING", logger="trl_thr.thr_grpo_trainer")
    steps = NO_SIGNAL_WARNING_EVERY + 1
    args = make_config(tmp_path / "equal", thr_strategy=strategy, max_steps=steps, max_completion_length=4)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=equal_reward, args=args, train_dataset=tiny_dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["frac_no_learning_signal"] for entry in logs] == [1.0] * steps
    warnings = no_signal_warnings(caplog)  # the first batch, then every NO_SIGNAL_WARNING_EVERY-th while it lasts
    assert [w.split(" generation batch")[0] for w in warnings] == ["No learning signal for 1",
                                                                   f"No learning signal for {steps}"]
    assert "every group's completions got equal rewards, so every advantage is 0" in warnings[0]

    caplog.clear()
    args = make_config(tmp_path / "masked", thr_strategy=strategy, max_steps=1, max_completion_length=1,
                       mask_truncated_completions=True)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset())
    trainer.train()  # one token: every completion is truncated, and masked
    (warning,) = no_signal_warnings(caplog)
    assert "every completion reached max_completion_length=1 and mask_truncated_completions=True" in warning

    caplog.clear()
    args = make_config(tmp_path / "varied", thr_strategy=strategy)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset())
    trainer.train()
    assert [e["frac_no_learning_signal"] for e in trainer.state.log_history if "loss" in e] == [0.0, 0.0]
    assert no_signal_warnings(caplog) == []


def generate(trainer, model_path):
    recorder = KernelRecorder()
    with recorder.patch:
        batch = trainer._generate_and_score_completions(two_prompts(model_path))
    return batch, recorder


@pytest.mark.parametrize("p", [0.3, -0.3])
def test_positive_and_negative_amplify_give_one_plus_and_minus_abs_p(p, tiny_model_path, tmp_path):
    weights, thrs = {}, {}
    for strategy in ("positive-amplify", "negative-amplify"):
        # negative-amplify reads p's magnitude whatever its sign; positive-amplify refuses a negative p (test_config)
        given = abs(p) if strategy == "positive-amplify" else p
        trainer = ragged_trainer(tiny_model_path, tmp_path / strategy, thr_strategy=strategy, thr_p=given)
        batch, recorder = generate(trainer, tiny_model_path)
        weights[strategy], (thrs[strategy],) = batch["thr_weights"], recorder.outputs
    torch.testing.assert_close(thrs["positive-amplify"], thrs["negative-amplify"])  # same batch, same THR
    thr, mask = thrs["positive-amplify"], batch["completion_mask"].bool()
    assert (thr[mask] > 0).any() and (thr[mask] < 0).any(), "both signs are needed to tell the strategies apart"
    sign = thr.sign() * mask
    assert torch.equal(weights["positive-amplify"], (1 + abs(p) * sign) * mask)
    assert torch.equal(weights["negative-amplify"], (1 - abs(p) * sign) * mask)


def correct_if_short(completion_ids, **kwargs):
    """A 0/1 "correctness" reward that disagrees with the length reward about who is positive."""
    return [float(len(ids) < 4) for ids in completion_ids]


@pytest.mark.parametrize("func", ["correct_if_short", None], ids=["one-function", "weighted-sum"])
def test_reward_threshold_positive_set_reaches_the_weights(func, tiny_model_path, tmp_path):
    threshold = 1.0 if func else 6.5
    trainer = ragged_trainer(tiny_model_path, tmp_path, reward_funcs=[length_of_completion, correct_if_short],
                             thr_positive_reward_threshold=threshold, thr_positive_reward_func=func,
                             thr_vocab="full")
    batch, recorder = generate(trainer, tiny_model_path)
    lengths = [float(n) for n in LENGTHS]
    correct = correct_if_short([[0] * n for n in LENGTHS])
    total = [a + b for a, b in zip(lengths, correct)]
    positive = [c >= threshold for c in (correct if func else total)]
    advantage_positive = [r > sum(total[g : g + 4]) / 4 for g in (0, 4) for r in total[g : g + 4]]
    assert positive != advantage_positive, "the threshold picks the same set as A > 0: the test would not see it"

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64)
    grads, _ = per_token_gradients(model, batch, LENGTHS, TEMPERATURE)
    expected = reference_thr(grads, batch["completion_ids"], LENGTHS, total, NUM_GENERATIONS, "full",
                             positive=positive)
    (thr,) = recorder.outputs
    torch.testing.assert_close(thr.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    mask = batch["completion_mask"]
    torch.testing.assert_close(batch["thr_weights"], ((1 + 0.5 * expected.sign()) * mask).float())


def reward_for_first_prompt_only(prompts, completion_ids, **kwargs):
    """Length for the first prompt's group; a constant for the second, so that group is skipped."""
    return [float(len(ids)) if prompt == prompts[0] else 1.0 for prompt, ids in zip(prompts, completion_ids)]


def recomputed_metrics(records, quantile):
    """`thr/*` metrics from the kernel's THR and the trainer's weights, pooled over `records` (one per process)."""
    totals = dict(tokens=0, active=0, kept=0, pos=0, neg=0, weight=0.0, abs=0.0, tau=0.0, taus=0, groups=0,
                  skipped=0)
    for record in records:
        thr, weights, mask, advantages = record["thr"], record["weights"], record["mask"].bool(), record["advantages"]
        for group in range(thr.size(0) // NUM_GENERATIONS):
            rows = slice(group * NUM_GENERATIONS, (group + 1) * NUM_GENERATIONS)
            positive = record["positive"][rows] if record["positive"] is not None else advantages[rows] > 0
            totals["groups"] += 1
            if not positive.any() or advantages[rows].max() == advantages[rows].min():
                totals["skipped"] += 1
                continue
            values = thr[rows][mask[rows]].abs()
            keep = math.ceil(quantile * values.numel())
            tau = values.sort(descending=True).values[keep].item() if keep < values.numel() else -math.inf
            totals["active"] += values.numel()
            totals["kept"] += int((values > tau).sum())
            totals["pos"] += int((thr[rows][mask[rows]] > 0).sum())
            totals["neg"] += int((thr[rows][mask[rows]] < 0).sum())
            totals["abs"] += values.sum().item()
            if math.isfinite(tau):
                totals["tau"] += tau
                totals["taus"] += 1
        totals["tokens"] += int(mask.sum())
        totals["weight"] += weights[mask].sum().item()
    return {
        "thr/kept_frac": totals["kept"] / totals["active"],
        "thr/pos_frac": totals["pos"] / totals["active"],
        "thr/neg_frac": totals["neg"] / totals["active"],
        "thr/mean_weight": totals["weight"] / totals["tokens"],
        "thr/tau": totals["tau"] / totals["taus"],
        "thr/abs_mean": totals["abs"] / totals["active"],
        "thr/groups_skipped_frac": totals["skipped"] / totals["groups"],
    }


def test_metrics_equal_a_recomputation(tiny_model_path, tmp_path):
    trainer = ragged_trainer(tiny_model_path, tmp_path, reward_funcs=reward_for_first_prompt_only,
                             thr_strategy="positive-amplify", thr_threshold="quantile", thr_quantile=0.4)
    batch, recorder = generate(trainer, tiny_model_path)
    record = dict(thr=recorder.outputs[0], weights=batch["thr_weights"], mask=batch["completion_mask"],
                  advantages=batch["advantages"], positive=None)
    expected = recomputed_metrics([record], quantile=0.4)
    assert expected["thr/groups_skipped_frac"] == 0.5 and 0 < expected["thr/kept_frac"] < 1
    assert expected["thr/pos_frac"] != expected["thr/neg_frac"]
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items() if key in expected}
    assert logged == pytest.approx(expected, rel=1e-6)


def test_metrics_and_positive_sets_over_two_processes(tiny_model_path, tmp_path):
    """Each rank has other rewards (so other positive sets); the logged metrics are those of the pooled batch."""
    result = launch_two_processes(WORKERS / "distributed_metrics_run.py", tiny_model_path, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [torch.load(tmp_path / f"metrics-rank{rank}.pt") for rank in (0, 1)]
    for rank, record in enumerate(records):
        # This process's rows of the gathered rewards: the positive set is its own completions'.
        assert torch.equal(record["positive"], record["own_rewards"] >= record["threshold"]), f"rank {rank}"
    assert not torch.equal(records[0]["positive"], records[1]["positive"])
    expected = recomputed_metrics(records, quantile=records[0]["quantile"])
    for rank, record in enumerate(records):
        logged = {key: value for key, value in record["logged"].items() if key in expected}
        assert logged == pytest.approx(expected, rel=1e-6), f"rank {rank}"


def float64_inputs(path, batch=4, length=6, prompt_length=5):
    """A float64 generation-batch-like dict; old log-probs off the current ones, so ratios differ from 1 and some
    tokens are clipped. Row 1 is padded from position 4, row 3 from position 2."""
    gen = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (batch, prompt_length), generator=gen)
    completion_ids = torch.randint(3, vocab, (batch, length), generator=gen)
    completion_mask = torch.ones(batch, length, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, completion_ids], 1)).logits[:, prompt_length - 1 : -1]
        logps = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones(batch, prompt_length, dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.4, 0.7, -1.5], dtype=torch.float64),
        "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": logps + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64),
    }


def float64_trainer(path, output_dir, **overrides):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    args = THRGRPOConfig(output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=4, beta=0.0,
                         **CPU, **overrides)
    return THRGRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "vespo"])
def test_uniform_weight_scales_the_gradient(loss_type, tiny_variant_path, tmp_path):
    path = tiny_variant_path("qwen2-untied")
    trainer = float64_trainer(path, tmp_path, loss_type=loss_type)
    inputs = float64_inputs(path)
    ones = torch.ones(4, 6, dtype=torch.float64)
    _, unit = loss_and_grads(trainer, {**inputs, "thr_weights": ones})
    for c in (2.0, 0.5):  # powers of two: scaling is exact in floating point
        _, scaled = loss_and_grads(trainer, {**inputs, "thr_weights": c * ones})
        for name in unit:
            assert torch.equal(scaled[name], c * unit[name]), (c, name)
    # Any other c is exact up to round-off: TRL 1.16's fused head returns float32 log-probs for a float64 model.
    _, scaled = loss_and_grads(trainer, {**inputs, "thr_weights": 0.7 * ones})
    for name in unit:
        torch.testing.assert_close(scaled[name], 0.7 * unit[name], rtol=0, atol=1e-6 * unit[name].abs().max().item())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_a_weight_on_one_token_changes_only_its_contribution(loss_type, tiny_variant_path, tmp_path):
    """The loss is linear in the weights: raising token (j, t) by delta adds delta times that token's own gradient
    (the gradient with weight 1 there and 0 elsewhere), and that gradient differs from every other token's; a weight
    on a padding token changes nothing, bit for bit."""
    path = tiny_variant_path("qwen2-untied")
    trainer = float64_trainer(path, tmp_path, loss_type=loss_type)
    inputs = float64_inputs(path)
    mask = inputs["completion_mask"].double()
    _, base = loss_and_grads(trainer, {**inputs, "thr_weights": mask})
    token = torch.zeros_like(mask)
    token[2, 3] = 1.0
    _, alone = loss_and_grads(trainer, {**inputs, "thr_weights": token})
    _, raised = loss_and_grads(trainer, {**inputs, "thr_weights": mask + 0.25 * token})
    assert any(alone[name].abs().sum() > 0 for name in alone)
    other = torch.zeros_like(mask)
    other[0, 3] = 1.0
    _, other_alone = loss_and_grads(trainer, {**inputs, "thr_weights": other})
    assert any(not torch.allclose(alone[name], other_alone[name]) for name in alone)
    for name in base:
        # Round-off of TRL's float32 log-probs only (see above).
        torch.testing.assert_close(raised[name] - base[name], 0.25 * alone[name], rtol=0,
                                   atol=1e-6 * base[name].abs().max().item())
    padding = torch.zeros_like(mask)
    padding[3, 4] = 1.0  # row 3 is padded from position 2
    assert inputs["completion_mask"][3, 4] == 0
    _, padded = loss_and_grads(trainer, {**inputs, "thr_weights": mask + 5.0 * padding})
    for name in base:
        assert torch.equal(padded[name], base[name]), name


# ---- claims of README.md and docs/theory.md ---------------------------------------------------------------------


def test_quantile_ties_at_the_boundary_are_dropped_together():
    """docs/theory.md §2: tau is the largest |THR| left out of the top ceil(q n); tokens tied with it go too."""
    from trl_thr import group_thresholds, thr_weights

    thr = torch.tensor([[3.0, -2.0, 2.0, 1.0], [2.0, -0.5, 0.1, 0.2]])  # 8 tokens, |THR| = 2 three times
    advantages, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 4)
    taus = group_thresholds(thr, advantages, mask, 2, threshold="quantile", quantile=0.25)  # top ceil(2) = 2
    assert taus.tolist() == [2.0]
    weights = thr_weights(thr, advantages, mask, 2, strategy="dominant-only", taus=taus)
    assert weights.sum() == 1 and weights[0, 0] == 1  # only the 3: the three tied 2s are dropped together


def test_num_iterations_reuses_the_weights_of_the_generation_batch(tiny_model_path, tmp_path):
    """docs/theory.md §4: THR is computed once per generation batch; every iteration on it uses the same weights."""
    from unittest.mock import patch

    from trl import GRPOTrainer

    args = THRGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                         num_iterations=2, max_completion_length=6, max_steps=2, learning_rate=0.1, seed=0,
                         thr_threshold="none", **CPU)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                             train_dataset=tiny_dataset())
    seen, original = [], GRPOTrainer._compute_loss

    def record(self, model, inputs):
        seen.append({k: inputs[k].clone() for k in ("completion_ids", "advantages")})
        return original(self, model, inputs)

    recorder = KernelRecorder()
    with recorder.patch, patch.object(GRPOTrainer, "_compute_loss", record):
        trainer.train()
    assert len(recorder.outputs) == 1 and len(seen) == 2  # one generation batch, two optimizer steps on it
    assert torch.equal(seen[0]["completion_ids"], seen[1]["completion_ids"])
    assert torch.equal(seen[0]["advantages"], seen[1]["advantages"])  # the weighted (B, T) advantages
    assert seen[0]["advantages"].dim() == 2


def test_each_metric_by_value_on_a_batch_built_by_hand(tiny_model_path, tmp_path, monkeypatch):
    """`_log_thr_metrics` on five groups of three whose answers are known: an active group with a zero-advantage
    row (THR 0), an all-equal group, a group with no row in the positive set, an active group whose tau is
    `-inf` (every token kept), and one more active group."""
    trainer = ragged_trainer(tiny_model_path, tmp_path, thr_strategy="positive-amplify", thr_p=0.25)
    G, T = 3, 4
    thr = torch.tensor([[0.5, -0.1, 0.3, 0.0], [-0.6, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                        [0.4, -0.4, 0.0, 0.0], [-0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                        [0.7, 0.1, -0.05, 0.0], [-0.3, 0.0, 0.0, 0.0], [0.2, 0.2, 0.0, 0.0],
                        [0.9, -0.8, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0], [-0.25, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1],
                         [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0],
                         [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0],
                         [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0],
                         [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.5, -0.5, 0.0, 1.0, -1.0, 0.0, 1.0, -0.5, -0.5])
    positive = torch.tensor([True, False, False, False, False, False, False, False, False,
                             True, False, False, True, False, False])  # group 2 has advantage > 0, not in P
    taus = torch.tensor([0.25, math.nan, math.nan, -math.inf, 0.125])  # exact in float32: no rounding at the boundary
    weights = torch.where(mask.bool(), 1.0 + 0.25 * thr.sign(), 0.0)
    record = THRBatch.build(thr, weights, taus, advantages, mask, G, positive, 0.25)
    trainer._log_thr_metrics("train", record, seconds=3.0, forward_seconds=5.0)

    active_rows = [0, 1, 2, 9, 10, 11, 12, 13, 14]  # groups 0, 3 and 4
    counted = [(row, t) for row in active_rows for t in range(T) if mask[row, t]]
    values = [thr[row, t].item() for row, t in counted]
    row_tau = {0: 0.25, 1: 0.25, 2: 0.25, 9: -math.inf, 10: -math.inf, 11: -math.inf, 12: 0.125, 13: 0.125, 14: 0.125}
    expected = {
        "thr/kept_frac": sum(abs(thr[row, t].item()) > row_tau[row] for row, t in counted) / len(counted),
        "thr/pos_frac": sum(v > 0 for v in values) / len(counted),
        "thr/neg_frac": sum(v < 0 for v in values) / len(counted),
        "thr/mean_weight": weights[mask.bool()].sum().item() / mask.sum().item(),
        "thr/tau": (0.25 + 0.125) / 2,  # the -inf of group 3 and the NaN of skipped groups are left out
        "thr/abs_mean": sum(abs(v) for v in values) / len(counted),
        "thr/groups_skipped_frac": 2 / 5,
        "thr/p": 0.25,
        "thr/seconds": 3.0,
        "thr/forward_seconds": 5.0,
    }
    assert expected["thr/pos_frac"] + expected["thr/neg_frac"] < 1  # zero-THR tokens count as neither
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    assert logged == pytest.approx(expected, rel=1e-6)

    # Two processes holding the same batch: the counts double, every fraction and the mean times stay the same.
    monkeypatch.setattr(trainer.accelerator, "reduce", lambda tensor, reduction="sum": tensor * 2)
    record = THRBatch.build(thr, weights, taus, advantages, mask, G, positive, 0.25)
    trainer._log_thr_metrics("train", record, seconds=3.0, forward_seconds=5.0)
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    assert logged == pytest.approx(expected, rel=1e-6)


def test_thr_seconds_add_the_kernel_and_the_weights(tiny_model_path, tmp_path, monkeypatch):
    """`thr/seconds` is the time of THR and of its weights; `thr/forward_seconds` that of getting the states."""
    trainer = ragged_trainer(tiny_model_path, tmp_path)
    monkeypatch.setattr(trainer, "_seconds_since", lambda start: 1.5)  # every timed stretch takes 1.5 s
    generate(trainer, tiny_model_path)
    assert trainer._metrics["train"]["thr/seconds"] == [3.0]
    assert trainer._metrics["train"]["thr/forward_seconds"] == [1.5]


def correct_if_one_token(completion_ids, **kwargs):
    return [float(len(ids) < 2) for ids in completion_ids]


@pytest.mark.parametrize("func", ["correct_if_one_token", None], ids=["one-function", "weighted-sum"])
def test_a_group_without_a_rewarded_completion_keeps_weight_one(func, tiny_model_path, tmp_path):
    """Only the first group has a one-token completion: under the reward threshold the second group has no
    positive completion, so THR leaves it alone (weight 1, a skipped group), although some of its advantages
    are > 0 (were it taken as active, its THR of 0 would fall under the anchor and get weight 0). The weighted sum
    counts `reward_weights`."""
    trainer = ragged_trainer(tiny_model_path, tmp_path, reward_funcs=[length_of_completion, correct_if_one_token],
                             thr_positive_reward_threshold=1.0 if func else 4.0, thr_positive_reward_func=func,
                             reward_weights=[0.25, 4.0], thr_strategy="dominant-only", thr_threshold="anchor")
    batch, _ = generate(trainer, tiny_model_path)
    mask = batch["completion_mask"].float()
    assert (batch["advantages"][4:] > 0).any()
    assert torch.equal(batch["thr_weights"][4:], mask[4:])
    assert not torch.equal(batch["thr_weights"][:4], mask[:4])
    assert trainer._metrics["train"]["thr/groups_skipped_frac"] == [0.5]


def test_p_is_logged_only_by_the_strategies_that_use_it(tiny_model_path, tmp_path):
    for strategy, logs_p in (("negative-amplify", True), ("dominant-only", False), ("nthr", False)):
        trainer = ragged_trainer(tiny_model_path, tmp_path / strategy, thr_strategy=strategy, thr_p=0.2,
                                 thr_threshold="none")
        generate(trainer, tiny_model_path)
        assert ("thr/p" in trainer._metrics["train"]) is logs_p, strategy
        if logs_p:  # the p the weights use: negative-amplify's is -|p|
            assert trainer._metrics["train"]["thr/p"] == [-0.2]


def test_weights_from_config_passes_every_threshold_field():
    """Each `thr_*` threshold field, the positive set and the gather reach `group_thresholds` and `thr_weights`:
    the config's result equals the explicit call, and differs from the result without that field."""
    from trl_thr.thr import group_thresholds, thr_weights
    from trl_thr.thr_grpo_trainer import weights_from_config

    gen = torch.Generator().manual_seed(0)
    thr = torch.rand(8, 5, generator=gen) * 2 - 0.5  # row means near 0.5: beta moves the anchor
    mask = torch.ones(8, 5)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, 1.0, -1.0, -1.0])
    positive = torch.tensor([True, True, False, False, False, True, False, False])

    def gather(values):  # another process's values, all large: they move a batch quantile
        return torch.cat([values, torch.full((40,), 10.0)])

    def explicit(strategy, p, positive_mask=None, gather_values=None, **threshold):
        taus = group_thresholds(thr, advantages, mask, 2, positive_mask=positive_mask, gather_values=gather_values,
                                **threshold)
        return thr_weights(thr, advantages, mask, 2, strategy=strategy, p=p, taus=taus, positive_mask=positive_mask)

    cases = [
        (dict(thr_threshold="anchor", thr_beta=0.3), dict(threshold="anchor", beta=0.3), dict(threshold="anchor")),
        (dict(thr_threshold="absolute", thr_tau=0.8), dict(threshold="absolute", tau=0.8),
         dict(threshold="absolute", tau=0.0)),
        (dict(thr_threshold="quantile", thr_quantile=0.5, thr_quantile_scope="batch"),
         dict(threshold="quantile", quantile=0.5, quantile_scope="batch"),
         dict(threshold="quantile", quantile=0.5)),
    ]
    for fields, threshold, without_field in cases:
        args = THRGRPOConfig(output_dir="unused", thr_strategy="positive-amplify", thr_p=0.3, **fields, **CPU)
        for positive_mask, gather_values in ((None, None), (positive, gather)):
            weights, taus = weights_from_config(args, thr, advantages, mask, 2, p=0.3, positive_mask=positive_mask,
                                                gather_values=gather_values)
            expected = explicit("positive-amplify", 0.3, positive_mask, gather_values, **threshold)
            assert torch.equal(weights, expected), fields
            expected_taus = group_thresholds(thr, advantages, mask, 2, positive_mask=positive_mask,
                                             gather_values=gather_values, **threshold)
            torch.testing.assert_close(taus, expected_taus, equal_nan=True, rtol=0, atol=0)
            assert not torch.equal(weights, explicit("positive-amplify", 0.3, positive_mask, gather_values,
                                                     **without_field)), f"{fields}: the case cannot tell"
        assert not torch.equal(explicit("positive-amplify", 0.3, positive, gather, **threshold),
                               explicit("positive-amplify", 0.3, None, gather, **threshold)), "positive set"
    quantile = dict(threshold="quantile", quantile=0.5, quantile_scope="batch")
    assert not torch.equal(explicit("positive-amplify", 0.3, None, gather, **quantile),
                           explicit("positive-amplify", 0.3, None, None, **quantile)), "gather"


def test_the_kernel_gets_the_config_and_the_head(tiny_model_path, tmp_path):
    """`thr_include_self`, `thr_block_elements`, `thr_log_normaliser` and the head's bias reach `compute_thr`."""
    for normaliser in ("trainer", "exact"):
        trainer = ragged_trainer(tiny_model_path, tmp_path / normaliser, thr_include_self=False,
                                 thr_block_elements=12345, thr_log_normaliser=normaliser)
        head = trainer.model.get_output_embeddings()
        head.bias = torch.nn.Parameter(torch.linspace(-1, 1, head.out_features))
        _, recorder = generate(trainer, tiny_model_path)
        (kwargs,) = recorder.kwargs
        assert kwargs["include_self"] is False and kwargs["block_elements"] == 12345
        assert torch.equal(kwargs["lm_head_bias"], head.bias.detach())
        assert (kwargs["token_logprobs"] is None) is (normaliser == "exact")


@pytest.mark.parametrize(
    "overrides",
    [dict(thr_hidden_source="generate"), dict(thr_hidden_source="forward"), dict(num_iterations=2)],
    ids=["generate", "forward", "old-logps"],
)
def test_states_and_gathered_head_are_freed_once_thr_is_computed(overrides, tiny_model_path, tmp_path, monkeypatch):
    """Neither the captured `(B, T, d)` states nor a gathered `(V, d)` head outlive the THR call: both are gone by
    the time the thresholds and weights are computed (their collectives, and the rest of the step, run without
    them)."""
    import gc
    import weakref
    from contextlib import contextmanager

    import trl_thr._trl_compat as compat
    import trl_thr.thr_grpo_trainer as trainer_module

    @contextmanager
    def gathered_head(head):  # stands in for a ZeRO-3/FSDP2 gather: a fresh (V, d) tensor, as full_tensor() gives
        yield head.weight.detach().clone(), head.bias

    seen = {}

    def recording_compute_thr(hidden_states, completion_ids, mask, weight, *args, **kwargs):
        seen.update(states=weakref.ref(hidden_states), head=weakref.ref(weight))
        return compute_thr(hidden_states, completion_ids, mask, weight, *args, **kwargs)

    weights_from_config = trainer_module.weights_from_config

    def checking_weights_from_config(*args, **kwargs):
        gc.collect()
        seen.update(states_alive=seen["states"]() is not None, head_alive=seen["head"]() is not None)
        return weights_from_config(*args, **kwargs)

    monkeypatch.setattr(compat, "full_lm_head", gathered_head)
    monkeypatch.setattr(trainer_module, "compute_thr", recording_compute_thr)
    monkeypatch.setattr(trainer_module, "weights_from_config", checking_weights_from_config)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward,
                             args=make_config(tmp_path, thr_threshold="none", **overrides),
                             train_dataset=tiny_dataset())
    trainer._generate_and_score_completions(list(tiny_dataset())[:1] * 4)
    assert seen["states_alive"] is False, "the captured states outlived the THR call"
    assert seen["head_alive"] is False, "the gathered LM head outlived the THR call"


def test_a_thr_failure_raises_one_clear_error(tiny_model_path, tmp_path, monkeypatch):
    import trl_thr.thr_grpo_trainer as trainer_module
    from trl_thr.thr_grpo_trainer import THRComputationError

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    trainer = ragged_trainer(tiny_model_path, tmp_path)
    monkeypatch.setattr(trainer_module, "compute_thr", out_of_memory)
    with pytest.raises(THRComputationError, match=r"^THR failed on 1 of 1 process\(es\), on this process: "
                                                  r"RuntimeError: out of memory \(simulated\)\. For an out-of-memory"):
        trainer._generate_and_score_completions(two_prompts(tiny_model_path))


def test_a_batch_of_partial_groups_is_refused_with_the_fix(tiny_model_path, tmp_path):
    trainer = ragged_trainer(tiny_model_path, tmp_path)
    message = (r"^THR needs whole groups on each process, but this process holds 6 completions, not a multiple of "
               rf"num_generations={NUM_GENERATIONS}\. Set per_device_train_batch_size \(times steps_per_generation "
               r"in training\) to a multiple of num_generations\.$")
    with pytest.raises(ValueError, match=message):
        trainer._compute_thr({"advantages": torch.zeros(6)}, None, None, None)


def length_unless_three_tokens(completion_ids, **kwargs):
    return [None if len(ids) == 3 else float(len(ids)) for ids in completion_ids]


def test_a_completion_without_any_reward_is_never_positive(tiny_model_path, tmp_path):
    """Every reward function gave `None` for the 3-token completion: it stays out of the positive set even under a
    threshold that every reward passes."""
    trainer = ragged_trainer(tiny_model_path, tmp_path, reward_funcs=[length_unless_three_tokens],
                             thr_positive_reward_threshold=-1.0)
    generate(trainer, tiny_model_path)
    assert trainer._positive_mask(len(LENGTHS)).tolist() == [length != 3 for length in LENGTHS]


def test_rejects_plain_grpo_config(tiny_model_path, tmp_path):
    with pytest.raises(TypeError, match="needs a THRGRPOConfig"):
        THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward,
                       args=GRPOConfig(output_dir=str(tmp_path), **CPU), train_dataset=tiny_dataset())


def test_unknown_positive_reward_func(tiny_model_path, tmp_path):
    args = make_config(tmp_path, thr_positive_reward_threshold=1.0, thr_positive_reward_func="accuracy")
    with pytest.raises(ValueError, match="thr_positive_reward_func='accuracy' is not one of"):
        THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())


def length_in_the_first_group(completion_ids, **kwargs):
    """The length in group 0 (rows 0-3), the same reward for every completion of group 1: THR skips group 1."""
    return [float(len(ids)) if row < NUM_GENERATIONS else 1.0 for row, ids in enumerate(completion_ids)]


def test_the_entropy_overlap_masks_cover_the_groups_thr_applies_to_only(tiny_model_path, tmp_path):
    """The masks a generation batch carries to the loss forward for `thr/entropy_overlap`: `thr_active` is the counted
    tokens of the groups THR applies to (a group it skips takes no part in the entropy quantile), and the dominant
    tokens are among them."""
    trainer = ragged_trainer(tiny_model_path, tmp_path, reward_funcs=length_in_the_first_group,
                             thr_strategy="positive-amplify", thr_threshold="anchor")
    batch, _ = generate(trainer, tiny_model_path)
    counted = batch["completion_mask"].bool()
    assert torch.equal(batch["thr_active"][:NUM_GENERATIONS], counted[:NUM_GENERATIONS])
    assert not batch["thr_active"][NUM_GENERATIONS:].any() and counted[NUM_GENERATIONS:].any()
    assert batch["thr_dominant"].any() and not (batch["thr_dominant"] & ~batch["thr_active"]).any()


def direct_entropy_overlap(path, inputs, dominant, active, temperature):
    """`thr/entropy_overlap` by its definition, from a float64 forward of its own: of the dominant tokens, the share
    whose sampling entropy is at least the 0.8 quantile of the active tokens' entropies."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    prompt_length = inputs["prompt_ids"].size(1)
    with torch.no_grad():
        logits = model(torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)).logits
    logps = torch.log_softmax(logits[:, prompt_length - 1 : -1] / temperature, -1)
    entropies = -(logps.exp() * logps).sum(-1)  # (B, T)
    threshold = torch.quantile(entropies[active], 0.8)
    high = (entropies >= threshold) & active
    return (dominant & high).sum().item() / dominant.sum().item(), high


@pytest.mark.parametrize("level", ["token", "sequence_token"])
def test_entropy_overlap_equals_a_direct_computation(level, tiny_variant_path, tmp_path):
    path = tiny_variant_path("qwen2-untied")
    trainer = float64_trainer(path, tmp_path, temperature=0.7, importance_sampling_level=level)
    trainer.model.train()  # TRL logs a training forward's metrics under "train"
    trainer.current_gradient_accumulation_steps = 1
    inputs = float64_inputs(path)
    active = inputs["completion_mask"].bool().clone()
    active[1] = False  # a group THR does not apply to: its tokens take no part in the quantile
    dominant = torch.zeros_like(active)
    dominant[0, :5] = dominant[2, 1:4] = dominant[3, 1] = True
    expected, high = direct_entropy_overlap(path, inputs, dominant, active, temperature=0.7)
    # The batch tells the rule from near misses: the quantile over every counted token, or at temperature 1.
    assert 0 < expected < 1
    assert direct_entropy_overlap(path, inputs, dominant, inputs["completion_mask"].bool(), 0.7)[0] != expected
    assert direct_entropy_overlap(path, inputs, dominant, active, temperature=1.0)[0] != expected

    trainer._compute_loss(trainer.model, {**inputs, "thr_dominant": dominant, "thr_active": active})
    assert trainer._metrics["train"]["thr/entropy_overlap"] == [pytest.approx(expected, rel=1e-9)]
    assert trainer._entropy_overlap_masks is None  # disarmed: no later forward is measured

    # Without dominant tokens there is nothing to measure: no value rather than 0.
    trainer._compute_loss(trainer.model, {**inputs, "thr_dominant": torch.zeros_like(active), "thr_active": active})
    assert len(trainer._metrics["train"]["thr/entropy_overlap"]) == 1


def test_entropy_overlap_is_logged_by_thr_runs_only(tiny_model_path, tmp_path):
    for strategy, logged in (("dominant-only", True), ("none", False)):
        trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward,
                                 args=make_config(tmp_path / strategy, thr_strategy=strategy, max_steps=1),
                                 train_dataset=tiny_dataset())
        trainer.train()
        history = trainer.state.log_history[0]
        assert ("thr/entropy_overlap" in history) is logged, strategy
        if logged:
            assert 0 <= history["thr/entropy_overlap"] <= 1


def test_a_positive_set_that_stays_empty_is_logged_warned_and_summarised(tiny_model_path, tmp_path, caplog):
    """A threshold no completion reaches (length rewards of at most 8, threshold 100): THR applies to no group."""
    from trl_thr.cli.summary import format_summary, summarize

    caplog.set_level("WARNING", logger="trl_thr.thr_grpo_trainer")
    args = make_config(tmp_path / "never", max_steps=2, thr_positive_reward_threshold=100.0)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["thr/frac_no_positive"] for entry in logs] == [1.0, 1.0]
    assert [entry["thr/groups_skipped_frac"] for entry in logs] == [1.0, 1.0]
    (warning,) = [r.getMessage() for r in caplog.records if "thr_positive_reward_threshold" in r.getMessage()]
    assert warning.startswith("No completion reached thr_positive_reward_threshold=100.0 (the weighted sum of the "
                              "rewards) in 1 generation batch(es) in a row: THR applied to no group")
    assert "The highest reward in the last batch was " in warning
    text = format_summary(summarize(trainer.state.log_history, 1.0, 2))
    assert "In 2 of 2 steps no completion reached thr_positive_reward_threshold" in text

    caplog.clear()
    args = make_config(tmp_path / "reached", max_steps=2, thr_positive_reward_threshold=1.0)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())
    trainer.train()
    assert [e["thr/frac_no_positive"] for e in trainer.state.log_history if "loss" in e] == [0.0, 0.0]
    assert not [r for r in caplog.records if "thr_positive_reward_threshold" in r.getMessage()]
    assert "no completion reached" not in format_summary(summarize(trainer.state.log_history, 1.0, 2))
