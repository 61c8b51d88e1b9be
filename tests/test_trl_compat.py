"""Canaries for every TRL internal trl-thr relies on (`trl_thr._trl_compat`): each fails loudly on a TRL upgrade
that changes what the package mirrors. They run on every tested TRL (`compat.TESTED_TRL`: `make test` on the newest,
`make test-trl-versions` on the others); where TRL 1.14 and 1.16 differ, a test compares with that version's own
code (`compat.FUSED_LM_HEAD`)."""

import inspect
import tomllib
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
import trl
from helpers import CPU, length_reward, tiny_dataset
from packaging.requirements import Requirement
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from trl_thr import _trl_compat as compat
from trl_thr.thr import transform_logits

if compat.FUSED_LM_HEAD:
    from trl.trainer.utils import add_fused_lm_head  # absent in TRL 1.14


def test_supported_trl_version():
    assert compat.trl_minor() in compat.TESTED_TRL
    compat.check_supported_trl()
    for version in ("1.17.0", "1.13.2", "1.15.0"):
        with patch.object(compat.trl, "__version__", version), pytest.raises(ImportError) as refused:
            compat.check_supported_trl()
        message = str(refused.value)
        assert "\n" not in message
        assert f"found trl {version}" in message and "tested with trl 1.14.x and 1.16.x" in message
        assert 'pip install "trl>=1.14,<1.17,!=1.15.*"' in message and "a newer trl-thr" in message
        assert ("Triton" in message) == (version == "1.15.0")


def test_an_untested_trl_is_refused_in_one_line_when_trl_thr_is_imported(tmp_path):
    """Before any other TRL import (an old TRL may lack the modules): `import trl_thr.THRGRPOTrainer` raises the one
    line, and the command line prints it and exits 2, with no traceback. (Every version's message: above.)"""
    import subprocess
    import sys

    version = "1.15.0"
    fake = f"import trl; trl.__version__ = {version!r}; "
    imported = subprocess.run([sys.executable, "-c", fake + "from trl_thr import THRGRPOTrainer"],
                              capture_output=True, text=True)
    assert imported.returncode == 1 and "UntestedTRLError: trl-thr is tested with trl 1.14.x and 1.16.x, found trl " \
        f"{version}" in imported.stderr
    command = subprocess.run([sys.executable, "-c", fake + "import sys; from trl_thr.cli import main; "
                              "sys.exit(main(['train', '--config', 'tiny_cpu', '--output_dir', 'unused']))"],
                             capture_output=True, text=True, cwd=tmp_path)
    lines = command.stderr.strip().splitlines()
    assert command.returncode == 2 and len(lines) == 1, command.stderr
    assert lines[0].startswith(f"trl-thr train: error: trl-thr is tested with trl 1.14.x and 1.16.x, found trl "
                               f"{version}") and 'pip install "trl>=1.14,<1.17,!=1.15.*"' in lines[0]


def test_an_untested_trl_runs_with_a_warning_when_allowed(monkeypatch):
    monkeypatch.setenv(compat.ALLOW_UNTESTED_TRL_ENV, "1")
    with patch.object(compat.trl, "__version__", "1.17.0"), pytest.warns(UserWarning, match="at your own risk"):
        compat.check_supported_trl()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_supported_trl()  # a tested TRL: no warning


def test_the_package_pins_what_it_relies_on():
    """TRL to the tested minors (`compat.TESTED_TRL`, 1.15 left out), in the dependencies and the `vllm` extra;
    transformers below its next major (which drops the `gradient_checkpointing` names TRL uses)."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    pins = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    (vllm_extra,) = map(Requirement, project["optional-dependencies"]["vllm"])
    assert vllm_extra.name == "trl" and vllm_extra.extras == {"vllm"}
    for trl_pin in (pins["trl"], vllm_extra.specifier):
        assert str(Requirement(compat.TRL_REQUIREMENT).specifier) == str(trl_pin)
        assert trl_pin.contains(trl.__version__)
        for minor in compat.TESTED_TRL:
            assert minor + ".0" in trl_pin and minor + ".9" in trl_pin
        for outside in ("1.13.9", "1.15.0", "1.15.9", "1.17.0"):
            assert outside not in trl_pin, outside
    assert set(compat.UNTESTABLE_TRL) == {"1.15"}
    assert "6.0.0" not in pins["transformers"] and "5.99" in pins["transformers"]
    import transformers

    assert pins["transformers"].contains(transformers.__version__)


def test_trainer_checks_the_trl_internals_it_calls():
    """At construction, a changed signature or a missing method is named in one line, not found deep in a step."""
    assert compat.changed_trl_internal() is None
    assert compat.LOG_PROB_FORWARD in compat.GRPO_CALLS  # 1.14: the call lands in `_full_logits_logps`

    def narrower(self, model, input_ids, attention_mask):
        pass

    with patch.object(GRPOTrainer, compat.LOG_PROB_FORWARD, narrower):
        changed = compat.changed_trl_internal()
    assert changed.startswith(f"GRPOTrainer.{compat.LOG_PROB_FORWARD}(self, model, input_ids, attention_mask)")
    assert "'logits_to_keep'" in changed
    with patch.object(GRPOTrainer, "get_high_entropy_mask", lambda self, entropies, mask, threshold, dim=0: None):
        assert compat.changed_trl_internal() is None  # a new optional parameter breaks none of our calls
    with patch.object(GRPOTrainer, "_compute_loss", lambda self, model, batch: None):
        changed = compat.changed_trl_internal()
    assert "GRPOTrainer._compute_loss(self, model, batch) no longer takes 'inputs'" in changed
    from trl_thr import THRGRPOConfig, THRGRPOTrainer

    args = THRGRPOConfig(output_dir="unused", **CPU)
    with patch.object(GRPOTrainer, "get_high_entropy_mask", None), pytest.raises(ImportError) as refused:
        THRGRPOTrainer(model="unused", args=args)
    message = str(refused.value)
    assert "\n" not in message and "GRPOTrainer.get_high_entropy_mask" in message and compat.TRL_REQUIREMENT in message


def test_forward_keys_are_exactly_the_multimodal_parameters_of_the_log_prob_forward():
    # On 1.14 `_get_per_token_logps_and_entropies(model, *args, **kwargs)` passes them on to `_full_logits_logps`.
    parameters = compat.grpo_forward_parameters()
    standard = {"self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                "compute_aux_loss"}
    assert set(compat.FORWARD_KEYS) == parameters - standard
    if not compat.FUSED_LM_HEAD:
        dispatcher = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
        assert [p.kind for p in dispatcher.values()][2] is inspect.Parameter.VAR_POSITIONAL
        assert "return self._full_logits_logps(" in inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies)


def test_loss_reads_the_forward_keys_from_the_inputs():
    # `_compute_loss` passes each forward key as `inputs.get(key)`: what `forward_kwargs` feeds THR's forward.
    source = inspect.getsource(GRPOTrainer._compute_loss)
    for key in compat.FORWARD_KEYS:
        assert f'{key}=inputs.get("{key}")' in source, key


def test_loss_reads_old_logps_and_level_after_the_forward():
    # GSPO-token (`token_level_ratio`) sets the old log-probs right after the training forward.
    source = inspect.getsource(GRPOTrainer._compute_loss)
    forward = source.index("self._get_per_token_logps_and_entropies(")
    assert source.index('inputs.get("old_per_token_logps")') > forward
    assert source.index("self.importance_sampling_level ==") > forward
    assert source.count("self._get_per_token_logps_and_entropies(") == 1


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # on-policy: TRL uses the training forward's own log-probs
        dict(num_iterations=2),
        dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, steps_per_generation=1),
        dict(gradient_accumulation_steps=1, per_device_train_batch_size=2, steps_per_generation=2),
    ],
)
def test_old_logp_condition_matches_what_trl_does(overrides, tiny_model_path, tmp_path):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=4, **CPU)
    kwargs.update(overrides)
    trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=GRPOConfig(**kwargs),
                          train_dataset=tiny_dataset())
    rows = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation
    batch = trainer._generate_and_score_completions(list(tiny_dataset())[: rows // 2] * 2)
    assert ("old_per_token_logps" in batch) == compat.trl_computes_old_logps(trainer)


def _tiny_config(kind: str):
    from transformers import CohereConfig, Gemma2Config, GraniteConfig

    common = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
    if kind == "gemma2-softcap":
        return Gemma2Config(final_logit_softcapping=3.0, **common)
    if kind == "cohere-scale":
        return CohereConfig(logit_scale=0.4, **common)
    return GraniteConfig(logits_scaling=2.5, **common)


def trl_log_probs(model, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`(B, L - 1)` log-probs of `ids[:, 1:]` as the installed TRL's trainer computes them: 1.16's fused LM head
    (`add_fused_lm_head`, which reads the logit transform from the config), or 1.14's `_full_logits_logps` (the
    model's own forward, whose logits transformers scales and soft-caps)."""
    if compat.FUSED_LM_HEAD:
        add_fused_lm_head(model, temperature=temperature)
        return model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    trainer = SimpleNamespace(temperature=temperature, model_kwarg_keys=inspect.signature(model.forward).parameters)
    log_probs, _, _ = GRPOTrainer._full_logits_logps(trainer, model, ids, torch.ones_like(ids), ids.size(1) - 1)
    return log_probs


@pytest.mark.parametrize("kind", ["gemma2-softcap", "cohere-scale", "granite-scaling"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logit_transform_matches_trls_log_probs(kind, temperature):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind)).eval()
    # Larger logits, so that scale and soft-cap matter.
    model.get_output_embeddings().weight.data.mul_(20)
    transform = compat.logit_transform_from_config(model.config)
    assert (transform["logit_scale"], transform["logit_softcap"]) != (1.0, None)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1]
        logits = model.get_output_embeddings()(hidden)
        ours = torch.log_softmax(transform_logits(logits, temperature=temperature, **transform), -1)
        ours = ours.gather(-1, ids[:, 1:, None]).squeeze(-1)
        theirs = trl_log_probs(model, ids, temperature)
        untransformed = torch.log_softmax(logits / temperature, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(untransformed, theirs, rtol=1e-3, atol=1e-3)  # the transform is what matched


def test_backbone_output_is_what_trls_log_probs_project(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    capture = compat.BackboneCapture()
    with torch.no_grad(), capture.attach(model.base_model, logits_to_keep=3):
        log_probs = trl_log_probs(model, ids)[:, -3:]
    hidden = capture.hidden_states()
    expected = torch.log_softmax(model.lm_head(hidden), -1).gather(-1, ids[:, -3:, None]).squeeze(-1)
    torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-5)
    assert capture.hidden_states() is None  # freed


def test_liger_kernel_is_refused_with_thr_where_its_log_probs_differ(tiny_model_path, tmp_path):
    """TRL 1.14's Liger path applies a narrower logit-scale rule than THR's transform: refused before the model loads,
    in one line with the fix. From 1.15 on, Liger's log-probs come from the fused head too."""
    from trl_thr import THRGRPOConfig, THRGRPOTrainer

    args = THRGRPOConfig(output_dir=str(tmp_path), use_liger_kernel=True, **CPU)
    if compat.FUSED_LM_HEAD:
        assert compat.liger_refusal(args) is None
        return
    with pytest.raises(ValueError) as refused:
        THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())
    message = str(refused.value)
    assert "\n" not in message and message.startswith("use_liger_kernel=True with THR")
    assert "lm_head_multiplier" in message and "Set use_liger_kernel=False" in message
    assert compat.liger_refusal(THRGRPOConfig(output_dir=str(tmp_path), **CPU)) is None


def test_a_peft_adapter_on_the_lm_head_is_refused(tiny_variant_path, tmp_path):
    """THR reads the LM head's base weight, which an adapter on `lm_head` leaves unchanged: THR refuses it on TRL 1.14,
    which would train it; TRL refuses it itself from 1.15 on. Plain GRPO (`none`) keeps TRL's behaviour."""
    from peft import LoraConfig

    from trl_thr import THRGRPOConfig, THRGRPOTrainer

    def build(strategy):
        args = THRGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                             thr_strategy=strategy, **CPU)
        return THRGRPOTrainer(model=tiny_variant_path("qwen2-untied"), reward_funcs=length_reward, args=args,
                              train_dataset=tiny_dataset(),
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))

    theirs = "Applying a PEFT adapter to `lm_head` is not supported"
    ours = "A PEFT adapter on `lm_head` is not supported with THR"
    with pytest.raises(ValueError, match=theirs if compat.FUSED_LM_HEAD else ours):
        build("positive-amplify")
    if not compat.FUSED_LM_HEAD:
        build("none")


class _State:
    def __init__(self, fsdp_plugin):
        self.fsdp_plugin = fsdp_plugin


class _Accelerator:
    def __init__(self, fsdp_plugin=None):
        self.state = _State(fsdp_plugin)


def test_fsdp1_is_recognised():
    from types import SimpleNamespace

    assert not compat.uses_fsdp1(_Accelerator())
    assert compat.uses_fsdp1(_Accelerator(SimpleNamespace(fsdp_version=1)))
    assert not compat.uses_fsdp1(_Accelerator(SimpleNamespace(fsdp_version=2)))
    # accelerate's plugin still carries the field this check reads
    from accelerate.utils import FullyShardedDataParallelPlugin

    assert "fsdp_version" in inspect.signature(FullyShardedDataParallelPlugin).parameters


def test_trainer_refuses_fsdp1(tiny_model_path, tmp_path):
    from trl_thr import THRGRPOConfig, THRGRPOTrainer

    args = THRGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, **CPU)
    with patch.object(compat, "uses_fsdp1", lambda accelerator: True), pytest.raises(ValueError, match="FSDP2"):
        THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())


def test_completions_table_reads_extra_columns_and_trackers_as_mirrored():
    # `log_completion_columns` appends to `_logs["extra"]` the way TRL flushes `log_extra` columns, and
    # `completion_trackers` picks the trackers TRL's `log()` sends the table to.
    generate = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert 'self._logs["extra"][column].extend(gather_object(values))' in generate
    log = inspect.getsource(GRPOTrainer.log)
    assert '**self._logs["extra"]' in log
    assert '"wandb" in self.args.report_to and wandb.run is not None' in log
    assert '"trackio" in self.args.report_to' in log


def test_generation_capture_reads_attributes_trl_sets(tiny_model_path, tmp_path):
    # `capture_unsupported_reason` branches on these GRPOTrainer attributes, and the trainer wraps
    # `_generate_single_turn(prompt_ids, images, multimodal_fields, ...)`.
    trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, train_dataset=tiny_dataset(),
                          args=GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                                          **CPU))
    for name in ("use_vllm", "use_transformers_continuous_batching", "rollout_func", "tools",
                 "environment_factories", "_is_vlm", "generation_config"):
        assert hasattr(trainer, name), name
    parameters = list(inspect.signature(GRPOTrainer._generate_single_turn).parameters)
    assert parameters[:4] == ["self", "prompt_ids", "images", "multimodal_fields"]
    source = inspect.getsource(GRPOTrainer._generate_single_turn)
    assert source.count("unwrapped_model.generate(") == 1  # one generate call on the plain path


def test_vllm_generation_is_built_and_synced_where_the_cpu_engine_hooks_in():
    """`CPUColocateVLLMGeneration` replaces TRL's `VLLMGeneration` by its module-level name while GRPOTrainer builds
    it, swaps the `LLM` name that `_init_vllm` calls, and syncs through `_iter_named_params` (the real engine is
    exercised by `make test-vllm`)."""
    from trl.generation import vllm_generation
    from trl.trainer import grpo_trainer

    assert "self.vllm_generation = VLLMGeneration(" in inspect.getsource(grpo_trainer.GRPOTrainer.__init__)
    assert grpo_trainer.VLLMGeneration is vllm_generation.VLLMGeneration
    init_source = inspect.getsource(vllm_generation.VLLMGeneration._init_vllm)
    assert "self.llm = LLM(" in init_source and "dtype" not in init_source  # TRL passes no dtype: vLLM picks one
    assert "self.vllm_generation.sync_weights()" in inspect.getsource(grpo_trainer.GRPOTrainer)
    assert inspect.isgeneratorfunction(vllm_generation.VLLMGeneration._iter_named_params)
    assert issubclass(compat.CPUColocateVLLMGeneration, vllm_generation.VLLMGeneration)


def test_server_mode_needs_cuda_as_trls_client_says():
    from trl.generation.vllm_client import VLLMClient

    assert 'device.type != "cuda"' in inspect.getsource(VLLMClient.init_communicator)
    args = GRPOConfig(output_dir="unused", use_vllm=True, vllm_mode="server", **CPU)
    assert "needs the trainer on a CUDA device" in compat.vllm_refusal(args)
    assert compat.vllm_refusal(GRPOConfig(output_dir="unused", use_vllm=True, vllm_mode="colocate", **CPU)) is None


def test_accelerate_builds_fsdp_only_from_a_gpu_like_state():
    """The silent DDP that `fsdp_requested_but_not_built` catches: accelerate's switch to FSDP lists no MULTI_CPU."""
    from accelerate.state import AcceleratorState

    source = inspect.getsource(AcceleratorState.__init__)
    switch = source[: source.index("self.distributed_type = DistributedType.FSDP")]
    branch = switch[switch.rindex("elif self.distributed_type in ["):]
    assert "DistributedType.MULTI_GPU" in branch and "MULTI_CPU" not in branch


def test_high_entropy_tokens_is_trls_top_entropy_quantile_rule():
    """`thr/entropy_overlap` reads TRL's `get_high_entropy_mask(entropies, mask, threshold)`: the threshold is the
    quantile (`1 - top_entropy_quantile`), tokens at or above it are kept, masked tokens never."""
    from types import SimpleNamespace

    from trl_thr._trl_compat import high_entropy_tokens

    assert list(inspect.signature(GRPOTrainer.get_high_entropy_mask).parameters) == [
        "self", "entropies", "mask", "threshold"]
    identity = SimpleNamespace(pad_across_processes=lambda t, dim, pad_index: t, gather=lambda t: t)
    trainer = SimpleNamespace(accelerator=identity)
    trainer.get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask.__get__(trainer)
    entropies = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.7, 0.8, 0.9, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    # 9 masked-in values 0.1..0.9: the 0.8 quantile is 0.74, so 0.8 and 0.9 are the top 20 %.
    expected = torch.tensor([[False] * 5, [False, False, True, True, False]])
    assert torch.equal(high_entropy_tokens(trainer, entropies, mask, 0.2), expected)


def test_a_cpu_run_is_told_by_use_cpu_even_where_cuda_is_present():
    """Server mode and FSDP are refused for a run that trains on a CPU: asked with use_cpu on a CUDA machine, or on a
    machine without CUDA."""
    from types import SimpleNamespace

    with patch("torch.cuda.is_available", return_value=True):
        assert compat.trains_on_cpu(SimpleNamespace(use_cpu=True))
        assert not compat.trains_on_cpu(SimpleNamespace(use_cpu=False))
    with patch("torch.cuda.is_available", return_value=False):
        assert compat.trains_on_cpu(SimpleNamespace(use_cpu=False))
