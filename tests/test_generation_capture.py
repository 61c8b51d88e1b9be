"""Generation capture: the states and log-normalisers recorded during `generate` are the teacher-forced ones."""

from types import SimpleNamespace

import pytest
import torch
from helpers import length_reward, tiny_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from trl_thr.generation_capture import GenerationCapture, capture_unsupported_reason
from trl_thr.thr import compute_thr, transform_logits

TEMPERATURE = 0.7
PROMPTS = ["What is 2 + 3?", "Add seven and one to get eight. Four", "The quick"]  # three prompt lengths
G = 2  # completions per prompt


def assert_relative(actual, expected, tol=1e-5):
    """Max abs difference at most `tol` times the largest |expected| (elementwise relative error is meaningless
    where values cross 0)."""
    scale = expected.abs().max().clamp(min=1e-30)
    error = (actual - expected).abs().max()
    assert error <= tol * scale, f"max abs error {error.item():.3g} > {tol} * {scale.item():.3g}"


def early_eos(model, tokenizer, max_new_tokens=10, seed=0):
    """EOS ids under which the seeded sampling of `generate_batch` stops some rows early and runs others to the
    limit: the tokenizer's EOS plus a token that one row samples mid-way and another row never samples."""
    stop = [tokenizer.eos_token_id]
    tokens = generate_batch(model, tokenizer, max_new_tokens=max_new_tokens, seed=seed, stop_eos=stop,
                            trim_eos=[])["completion_ids"]
    return pick_early_eos(tokens, tokenizer.eos_token_id)


def pick_early_eos(tokens, eos):
    """See `early_eos`; `tokens` `(B, T)` are what the seeded sampling gives without stopping."""
    for row in range(tokens.size(0)):
        candidate = int(tokens[row, 3])
        if candidate != eos and not (tokens == candidate).any(dim=1).all():
            return [eos, candidate]
    raise AssertionError("no token ends some rows early and leaves others: choose another seed")


def left_pad(rows, pad_id, multiple=None):
    width = max(len(r) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def trim_and_right_pad(generated, eos, pad_id, multiple=None):
    """TRL's transformers path: keep tokens up to and including the first EOS, then right-pad."""
    rows = []
    for row in generated.tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        rows.append(row[:cut])
    width = max(len(r) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def generate_batch(model, tokenizer, *, max_new_tokens=10, seed=0, stop_eos=None, trim_eos=None, multiple=None,
                   capture=None, **generate_kwargs):
    """Left-padded prompts, one sampled `generate`, TRL's trimming; recorded by `capture` if given."""
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS for _ in range(G)]
    prompt_ids, prompt_mask = left_pad(rows, tokenizer.pad_token_id, multiple)
    stop_eos = early_eos(model, tokenizer, max_new_tokens, seed) if stop_eos is None else stop_eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=TEMPERATURE,
                              eos_token_id=stop_eos, pad_token_id=tokenizer.pad_token_id, disable_compile=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        if capture is None:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                 **generate_kwargs)
        else:
            with capture.recording():
                out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                     **generate_kwargs)
    completion_ids, completion_mask = trim_and_right_pad(
        out[:, prompt_ids.size(1):], stop_eos if trim_eos is None else trim_eos, tokenizer.pad_token_id, multiple
    )
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


def causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def transform_of(model):
    config = causal_lm(model).config
    return {"logit_scale": getattr(config, "logit_scale", None) or 1.0,
            "logit_softcap": getattr(config, "final_logit_softcapping", None)}


def teacher_forced(model, batch, temperature=TEMPERATURE):
    """`(hidden (B, T, d), token_logprobs (B, T))` of one forward over prompt + completion, as the trainer's."""
    lm = causal_lm(model)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    length = batch["completion_ids"].size(1)
    with torch.no_grad():
        hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -length:]
        logits = transform_logits(lm.get_output_embeddings()(hidden).float(), temperature=temperature,
                                  **transform_of(model))
        logps = logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    return hidden, logps * batch["completion_mask"]


def thr_of(model, batch, hidden, logps, advantages):
    head = causal_lm(model).get_output_embeddings()
    return compute_thr(hidden, batch["completion_ids"], batch["completion_mask"], head.weight, advantages, G,
                       temperature=TEMPERATURE, token_logprobs=logps, lm_head_bias=head.bias, **transform_of(model))


def capture_for(model, **overrides):
    kwargs = {"temperature": TEMPERATURE, **transform_of(model), **overrides}
    return GenerationCapture.from_model(model, **kwargs)


def align(capture, model, batch):
    head = causal_lm(model).get_output_embeddings()
    return capture.align(batch["completion_ids"], batch["completion_mask"], head.weight, head.bias,
                         prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"])


ADVANTAGES = torch.tensor([1.0, -0.5, 0.8, -1.2, -0.3, 0.6])


def check_equivalence(model, batch, aligned):
    assert aligned is not None
    hidden, logps = aligned
    mask = batch["completion_mask"].bool()
    ref_hidden, ref_logps = teacher_forced(model, batch)
    assert hidden.shape == ref_hidden.shape and logps.shape == ref_logps.shape
    assert_relative(hidden[mask], ref_hidden[mask])
    assert_relative(logps, ref_logps)
    thr = thr_of(model, batch, hidden, logps, ADVANTAGES)
    ref_thr = thr_of(model, batch, ref_hidden, ref_logps, ADVANTAGES)
    streamed = thr_of(model, batch, ref_hidden, None, ADVANTAGES)  # LSE over the whole vocabulary, no log-probs
    assert thr.abs().max() > 0
    assert_relative(thr, ref_thr)
    assert_relative(thr, streamed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a shared machine, intra-op threads only contend (one generate call takes ~5 s
    with the default thread count under load, ~0.03 s with one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.mark.parametrize("variant", ["qwen2-tied", "qwen2-untied", "gemma2-softcap", "cohere-scale"])
def test_capture_equals_teacher_forced_forward(variant, tiny_variant_path, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_variant_path(variant)).eval()
    capture = capture_for(model)
    batch = generate_batch(model, tokenizer, capture=capture)
    lengths = batch["completion_mask"].sum(1)
    # The layout the check must cover: prompts of several lengths, rows that stop early and rows cut at the limit.
    assert len(set(batch["prompt_mask"].sum(1).tolist())) == 3
    assert lengths.min() < 10 and lengths.max() == 10
    assert capture.num_steps == 10
    check_equivalence(model, batch, align(capture, model, batch))


def test_wrong_transform_is_visible(tiny_variant_path, tokenizer):
    """The equivalence test can fail: the same records under another logit transform give other log-probs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_variant_path("gemma2-softcap")).eval()
    capture = capture_for(model, logit_softcap=None)
    batch = generate_batch(model, tokenizer, capture=capture)
    _, logps = align(capture, model, batch)
    _, ref_logps = teacher_forced(model, batch)
    assert (logps - ref_logps).abs().max() > 1e-2


def test_peft_records_the_adapted_policy(tiny_model_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                            init_lora_weights=False)).eval()  # B != 0: the adapter matters
    capture = capture_for(model)
    batch = generate_batch(model, tokenizer, capture=capture)
    aligned = align(capture, model, batch)
    check_equivalence(model, batch, aligned)
    with model.disable_adapter():
        reference_hidden, _ = teacher_forced(model, batch)
    mask = batch["completion_mask"].bool()
    assert (aligned[0][mask] - reference_hidden[mask]).abs().max() > 1e-3


def test_trailing_steps_and_padding_to_a_multiple(tiny_model_path, tokenizer):
    """Steps past every kept token (generate stopping later than TRL trims, as with `synced_gpus`) are dropped;
    columns past the last step (`pad_to_multiple_of`) are zeros under a zero mask."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    capture = capture_for(model)
    stop = [tokenizer.eos_token_id]  # never sampled here: generate runs all 10 steps
    untrimmed = generate_batch(model, tokenizer, stop_eos=stop, trim_eos=[])["completion_ids"]
    trim = [tokenizer.eos_token_id, *untrimmed[:, 5].tolist()]  # every row ends by position 5
    batch = generate_batch(model, tokenizer, capture=capture, stop_eos=stop, trim_eos=trim, multiple=16)
    assert capture.num_steps == 10 and batch["completion_ids"].size(1) == 16
    assert batch["completion_mask"].sum(1).max() <= 6
    aligned = align(capture, model, batch)
    check_equivalence(model, batch, aligned)
    assert not aligned[0][:, 10:].any() and not aligned[1][:, 10:].any()


@pytest.fixture(scope="module")
def recorded(tiny_model_path, tokenizer):
    """A model, its capture and a batch; `redo()` records the same generation again (align consumes records)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    capture = capture_for(model)

    def redo(**kwargs):
        return generate_batch(model, tokenizer, capture=capture, **kwargs)

    return SimpleNamespace(model=model, capture=capture, redo=redo)


def misaligned_cases(batch):
    longer_ids = torch.cat([batch["completion_ids"], batch["completion_ids"][:, :1]], 1)
    longer_mask = torch.cat([batch["completion_mask"], torch.ones_like(batch["completion_mask"][:, :1])], 1)
    swapped = torch.tensor([1, 0, 2, 3, 4, 5])
    shifted_ids = batch["completion_ids"].roll(1, dims=1)
    other_prompt = batch["prompt_ids"].clone()
    other_prompt[0, -1] += 1
    return {
        "more tokens than steps": ({**batch, "completion_ids": longer_ids, "completion_mask": longer_mask}, "steps"),
        "rows swapped": ({**batch, "completion_ids": batch["completion_ids"][swapped],
                          "completion_mask": batch["completion_mask"][swapped]}, "tokens"),
        "tokens shifted": ({**batch, "completion_ids": shifted_ids}, "tokens"),
        "fewer rows": ({k: v[:4] for k, v in batch.items()}, "rows"),
        "another prompt": ({**batch, "prompt_ids": other_prompt}, "prompt"),
    }


@pytest.mark.parametrize("case", ["more tokens than steps", "rows swapped", "tokens shifted", "fewer rows",
                                  "another prompt"])
def test_misaligned_completions_fall_back(case, recorded):
    batch = recorded.redo()
    bad, reason = misaligned_cases(batch)[case]
    assert align(recorded.capture, recorded.model, bad) is None
    assert reason in recorded.capture.reason
    assert recorded.capture.num_steps == 0  # freed
    assert align(recorded.capture, recorded.model, batch) is None  # records are consumed either way


def test_layouts_that_are_not_one_decode_fall_back(recorded, tokenizer):
    model, capture = recorded.model, recorded.capture
    stop = [tokenizer.eos_token_id]
    # Two generate calls in one block.
    with capture.recording():
        generate_batch(model, tokenizer, stop_eos=stop)
        batch = generate_batch(model, tokenizer, stop_eos=stop)
    assert align(capture, model, batch) is None and "generate" in capture.reason
    # Beam search and several sequences per prompt: generate runs on more rows than TRL's batch has.
    for kwargs in ({"num_return_sequences": 2}, {"num_beams": 2, "do_sample": False}):
        with capture.recording():
            generate_batch(model, tokenizer, stop_eos=stop, **kwargs)
        assert align(capture, model, batch) is None and "rows" in capture.reason, kwargs
    # Decoding without a cache feeds the whole sequence at each step.
    recorded.redo(stop_eos=stop, use_cache=False)
    assert align(capture, model, batch) is None and "cache" in capture.reason
    # A plain (teacher-forced) forward is no generate call either.
    with capture.recording(), torch.no_grad():
        model(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1))
    assert align(capture, model, batch) is None
    # Nothing recorded.
    with capture.recording():
        pass
    assert align(capture, model, batch) is None and "nothing" in capture.reason


def test_hooks_are_removed_even_on_errors(recorded):
    capture = recorded.capture
    modules = (capture.backbone, capture.lm_head)
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules]
    with pytest.raises(ValueError, match="boom"), capture.recording():
        assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules] != before
        with pytest.raises(RuntimeError, match="already active"), capture.recording():
            pass
        raise ValueError("boom")
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules] == before
    with torch.no_grad():  # and a forward outside the block records nothing
        recorded.model(input_ids=torch.tensor([[5, 6, 7]]))
    assert capture.num_steps == 0


def test_bad_arguments(recorded):
    model, capture = recorded.model, recorded.capture
    batch = recorded.redo()
    with pytest.raises(ValueError, match="completion_mask"):
        capture.align(batch["completion_ids"], batch["completion_mask"][:, :-1], model.lm_head.weight)
    with pytest.raises(ValueError, match="lm_head_weight"):
        capture.align(batch["completion_ids"], batch["completion_mask"], model.lm_head.weight[:, :4])
    with pytest.raises(ValueError, match="temperature"):
        GenerationCapture(capture.backbone, capture.lm_head, temperature=0)
    with pytest.raises(ValueError, match="output embeddings"):
        GenerationCapture.from_model(SimpleNamespace(base_model=torch.nn.Linear(2, 2),
                                                     get_output_embeddings=lambda: None))


def test_unsupported_reasons():
    plain = SimpleNamespace(use_vllm=False, use_transformers_continuous_batching=False, rollout_func=None,
                            tools=[], environment_factories=None, _is_vlm=False,
                            generation_config=GenerationConfig(max_new_tokens=4))
    assert capture_unsupported_reason(plain) is None
    assert capture_unsupported_reason(plain, multimodal_fields={"pixel_values": torch.zeros(1)}) == "multimodal"
    for field, value, reason in [("use_vllm", True, "vllm"), ("use_transformers_continuous_batching", True,
                                                              "continuous batching"),
                                 ("rollout_func", print, "rollout_func"), ("tools", [print], "tools"),
                                 ("_is_vlm", True, "multimodal"),
                                 ("generation_config", GenerationConfig(num_beams=2), "beam search")]:
        assert capture_unsupported_reason(SimpleNamespace(**{**vars(plain), field: value})) == reason


def test_trl_generation_path(tiny_model_path, tmp_path):
    """On TRL's own `_generate_single_turn` and batch layout (prompt padding, EOS trimming, `pad_to_multiple_of`),
    the aligned records equal TRL's fused-head log-probs and a teacher-forced forward, and give the same THR."""
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=G,
                      max_completion_length=10, temperature=TEMPERATURE, pad_to_multiple_of=8, use_cpu=True,
                      bf16=False, gradient_checkpointing=False, report_to="none", seed=0)
    trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())
    tokenizer = trainer.processing_class
    inputs = [{"prompt": p} for p in PROMPTS for _ in range(G)]
    torch.manual_seed(0)
    untrimmed = trainer._generate_and_score_completions(inputs)["completion_ids"]
    # TRL trims at these and stops generating on them: with the same seed, some rows end early, others run on.
    trainer.eos_token_ids = pick_early_eos(untrimmed, tokenizer.eos_token_id)
    trainer.generation_config.eos_token_id = trainer.eos_token_ids
    trainer.generation_kwargs["eos_token_id"] = trainer.eos_token_ids
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    capture = GenerationCapture.from_model(unwrapped, temperature=trainer.temperature)
    original = trainer._generate_single_turn
    generate_calls = []

    def recorded_generate(*args, **kwargs):
        generate_calls.append(capture_unsupported_reason(trainer, args[1], args[2]))
        with capture.recording():
            return original(*args, **kwargs)

    trainer._generate_single_turn = recorded_generate
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(inputs)
    assert generate_calls == [None]
    mask = batch["completion_mask"]
    assert batch["completion_ids"].size(1) == 16 and mask.sum(1).max() <= 10 < 16
    assert mask.sum(1).min() < mask.sum(1).max()
    aligned = align(capture, unwrapped, batch)
    assert aligned is not None, capture.reason
    hidden, logps = aligned

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    full_mask = torch.cat([batch["prompt_mask"], mask], 1)
    with torch.no_grad():
        trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, full_mask,
                                                                     batch["completion_ids"].size(1))
    assert_relative(logps, trl_logps * mask)
    check_equivalence(unwrapped, batch, aligned)
