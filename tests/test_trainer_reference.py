"""THR in the trainer against a reference that shares no code with trl_thr: autograd on the model itself.

THR is defined by the learning dynamics of the LM head (docs/theory.md §1): the per-token gradient of a completion
token's log-prob with respect to a linear head, hidden states held fixed, is `g h^T`, and

    THR_{j,t} = sign(A_j) * sum_{i in P} (1/|y_i|) * sum_k < grad_{i,k}, grad_{j,t} >_F.

Here each such gradient comes from `torch.autograd` through the model's own forward (its own logit scale or
soft-cap), divided by the sampling temperature, in float64. Completions are ragged: some stop at EOS well before
`max_completion_length`, so padding sits in the batch exactly where a masking bug would let it into THR.
"""

import pytest
import torch
from ragged import LENGTHS, NUM_GENERATIONS, TEMPERATURE, ragged_trainer, two_prompts
from thr_reference import per_token_gradients, reference_thr
from trainers import KernelRecorder
from transformers import AutoModelForCausalLM


@pytest.mark.parametrize("variant", ["qwen2-tied", "qwen2-untied", "gemma2-softcap", "cohere-scale"])
def test_trainer_thr_equals_autograd_reference(variant, tiny_variant_path, tmp_path):
    model_path = tiny_variant_path(variant)
    trainer = ragged_trainer(model_path, tmp_path)
    inputs = two_prompts(model_path)
    recorder = KernelRecorder()
    batches = {}
    with recorder.patch:
        for vocab in ("full", "sampled"):
            trainer.args.thr_vocab = vocab
            trainer.rollout_func.gen.manual_seed(0)  # the same completions for both
            batches[vocab] = trainer._generate_and_score_completions(inputs)
    batch = batches["full"]
    assert torch.equal(batch["completion_ids"], batches["sampled"]["completion_ids"])
    lengths = batch["completion_mask"].sum(1).tolist()
    assert lengths == LENGTHS, "the rollout's ragged lengths did not reach the batch"
    assert (batch["completion_ids"][batch["completion_mask"] == 0] == trainer.processing_class.pad_token_id).all()

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64)
    grads_delta, grads_weight = per_token_gradients(model, batch, lengths, TEMPERATURE)
    config = model.config
    if getattr(config, "final_logit_softcapping", None) is None:
        # The reference is literally the LM-head weight's gradient, up to the chain rule's constant.
        scale = getattr(config, "logit_scale", None) or 1.0
        for by_delta, by_weight in zip(grads_delta, grads_weight):
            torch.testing.assert_close(by_weight * TEMPERATURE / scale, by_delta, rtol=1e-10, atol=1e-12)
    rewards = [float(n) for n in LENGTHS]
    for vocab, thr in zip(("full", "sampled"), recorder.outputs):
        expected = reference_thr(grads_delta, batch["completion_ids"], lengths, rewards, NUM_GENERATIONS, vocab)
        assert (expected != 0).sum() == sum(LENGTHS)  # every real token of both groups, none of the padding
        scale = expected.abs().max()
        torch.testing.assert_close(thr.double(), expected, rtol=1e-4, atol=1e-5 * scale.item(),
                                   msg=lambda m: f"thr_vocab={vocab}: {m}")

        # What reaches the loss: amplify with threshold none gives 1 + p sign(THR) on real tokens, 0 on padding.
        weights = batches[vocab]["thr_weights"]
        expected_weights = (1 + 0.5 * expected.sign()) * batch["completion_mask"]
        clear = expected.abs() > 1e-3 * scale  # signs of values near 0 are round-off
        assert clear.sum() >= 0.9 * sum(LENGTHS)
        assert torch.equal(weights[clear], expected_weights[clear].float()), f"thr_vocab={vocab}"
        assert (weights[batch["completion_mask"] == 0] == 0).all()


def test_kernel_never_receives_a_batch_by_vocabulary_tensor(tiny_variant_path, tmp_path):
    """The trainer hands the kernel (B, T, d) hidden states and a (V, d) head, never (B, T, V) logits."""
    model_path = tiny_variant_path("qwen2-untied")
    trainer = ragged_trainer(model_path, tmp_path, thr_vocab="full")
    recorder = KernelRecorder()
    with recorder.patch:
        batch = trainer._generate_and_score_completions(two_prompts(model_path))
    batch_size, length = batch["completion_ids"].shape
    config = trainer.model.config
    vocab, hidden = config.vocab_size, config.hidden_size
    (numels,) = recorder.argument_numels
    assert max(numels) == max(batch_size * length * hidden, vocab * hidden)
    assert batch_size * length * vocab not in numels


# TRL's `env_mask` (a rollout's) becomes `tool_mask`: 0 on tokens the model did not write, which the loss leaves out.
# Some fall in positive completions (they would enter every THR's sum) and some in a negative one.
ENV_MASK = [[1] * n for n in LENGTHS]
for row, (start, stop) in {1: (2, 5), 3: (1, 3), 4: (3, 6), 7: (0, 2)}.items():
    ENV_MASK[row][start:stop] = [0] * (stop - start)


@pytest.mark.parametrize("vocab", ["full", "sampled"])
def test_tool_outputs_take_no_part_in_thr(vocab, tiny_variant_path, tmp_path):
    model_path = tiny_variant_path("qwen2-untied")
    trainer = ragged_trainer(model_path, tmp_path, env_mask=ENV_MASK, thr_vocab=vocab)
    recorder = KernelRecorder()
    with recorder.patch:
        batch = trainer._generate_and_score_completions(two_prompts(model_path))
    tool_mask = batch["tool_mask"].bool()
    assert (~tool_mask[batch["completion_mask"].bool()]).sum() == 10, "the rollout's env_mask did not reach the batch"

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64)
    grads, _ = per_token_gradients(model, batch, LENGTHS, TEMPERATURE)
    expected = reference_thr(grads, batch["completion_ids"], LENGTHS, [float(n) for n in LENGTHS], NUM_GENERATIONS,
                             vocab, counted=tool_mask.tolist())
    (thr,) = recorder.outputs
    scale = expected.abs().max().item()
    torch.testing.assert_close(thr.double(), expected, rtol=1e-4, atol=1e-5 * scale)
    assert (batch["thr_weights"][~tool_mask] == 0).all()
    counted = (batch["completion_mask"] * batch["tool_mask"]).bool()
    assert (batch["thr_weights"][counted] != 0).all()
