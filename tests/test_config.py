"""THRGRPOConfig: defaults, validation messages and parsing with TRL's parser."""

import tempfile
from pathlib import Path
from unittest.mock import PropertyMock, patch

import pytest
from helpers import CPU
from trl import TrlParser

from trl_thr import THRGRPOConfig


def config(**kwargs):
    output_dir = str(Path(tempfile.gettempdir()) / "thr-config-test")  # never written: a config only
    return THRGRPOConfig(**{**CPU, "output_dir": output_dir, "per_device_train_batch_size": 8, **kwargs})


def test_defaults_follow_the_paper():
    args = config()
    assert (args.thr_strategy, args.thr_p, args.thr_threshold, args.thr_beta) == ("positive-amplify", 0.1, "anchor",
                                                                                  1.0)
    assert (args.thr_vocab, args.thr_include_self, args.thr_p_schedule) == ("sampled", True, "constant")
    assert args.num_generations == 8  # GRPOConfig's defaults are untouched


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(thr_strategy="exploit"), r"thr_strategy='exploit' is not valid; choose one of"),
        (dict(thr_p=1.0), r"thr_p=1.0: \|p\| must be < 1"),
        (dict(thr_p=-1.5, thr_strategy="amplify"), r"\|p\| must be < 1"),
        # The paper writes exploration as p = -0.1: with positive-amplify (|p|) that sign would silently exploit.
        (dict(thr_p=-0.1), "thr_p=-0.1 with thr_strategy='positive-amplify'.*use thr_strategy='negative-amplify'"),
        (dict(thr_p=0.1, thr_p_end=-0.2, thr_p_schedule="linear"), "thr_p_end=-0.2 with thr_strategy='positive"),
        (dict(thr_p=-0.1, thr_strategy="negative-amplify"), None),
        (dict(thr_p=0.1, thr_strategy="negative-amplify"), None),  # a magnitude, as the default thr_p is
        (dict(thr_p=-0.1, thr_strategy="amplify"), None),
        (dict(thr_p="0.1"), r"thr_p='0.1' must be a number \(e.g. 0.1\), got str"),
        (dict(thr_p=True), "thr_p=True must be a number"),
        (dict(thr_p_end=0.99, thr_p_schedule="linear", thr_p=0.1, thr_strategy="amplify"), None),
        (dict(thr_p_end=1.2, thr_p_schedule="linear"), r"thr_p_end=1.2: \|p\| must be < 1"),
        (dict(thr_p_end=0.2), "thr_p_schedule='constant' ignores it"),
        (dict(thr_p_schedule="cosine"), "needs thr_p_end"),
        (dict(thr_p_schedule="cosine", thr_p_end=0.0, thr_strategy="nthr"), "has no effect with thr_strategy='nthr'"),
        (dict(thr_threshold="quantile"), r"needs thr_quantile in \(0, 1\]"),
        (dict(thr_threshold="quantile", thr_quantile=0.0), r"needs thr_quantile in \(0, 1\]"),
        (dict(thr_threshold="quantile", thr_quantile=1.1), r"needs thr_quantile in \(0, 1\]"),
        (dict(thr_quantile=0.2), "only used with thr_threshold='quantile'"),
        (dict(thr_threshold="absolute"), "needs thr_tau"),
        (dict(thr_tau=0.3), "only used with thr_threshold='absolute'"),
        (dict(thr_threshold="median"), "thr_threshold='median' is not valid"),
        (dict(thr_vocab="top-k"), "thr_vocab='top-k' is not valid"),
        (dict(thr_quantile_scope="global", thr_threshold="quantile", thr_quantile=0.2), "thr_quantile_scope="),
        (dict(thr_positive_reward_func="accuracy_reward"), "needs thr_positive_reward_threshold"),
        (dict(thr_block_elements=0), "thr_block_elements must be >= 1"),
        (dict(thr_beta=-0.5), "thr_beta=-0.5: the anchor threshold's multiplier must be >= 0"),
        (dict(thr_beta=0.0), None),
        (dict(thr_log_normaliser="approx"), "thr_log_normaliser='approx' is not valid"),
        (dict(thr_log_normaliser="exact"), None),
        (dict(thr_hidden_source="cache"), "thr_hidden_source='cache' is not valid"),
        (dict(importance_sampling_level="tok"), "importance_sampling_level='tok' is not valid"),
        (dict(importance_sampling_level="sequence_token", loss_type="vespo"), "no effect with loss_type='vespo'"),
    ],
)
def test_validation(kwargs, message):
    if message is None:
        config(**kwargs)
        return
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


def test_layout_is_not_checked_when_thr_is_off():
    config(thr_strategy="none", per_device_train_batch_size=2, num_generations=4, gradient_accumulation_steps=2)


def test_split_groups_are_fine_when_steps_per_generation_completes_them():
    args = config(per_device_train_batch_size=2, num_generations=4, gradient_accumulation_steps=2)
    assert args.steps_per_generation == 2


def test_warns_on_plain_sequence_level():
    with pytest.warns(UserWarning, match="sequence_token"):
        config(importance_sampling_level="sequence")


def test_warns_when_positive_set_is_batch_relative():
    with pytest.warns(UserWarning, match="thr_positive_reward_threshold"):
        config(multi_objective_aggregation="normalize_then_sum")


def test_trl_parser_reads_thr_fields_from_yaml_and_cli(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("output_dir: out\nuse_cpu: true\nbf16: false\nper_device_train_batch_size: 8\n"
                    "thr_strategy: negative-amplify\nthr_p: 0.2\nthr_threshold: quantile\nthr_quantile: 0.2\n"
                    "importance_sampling_level: sequence_token\n")
    (args,) = TrlParser((THRGRPOConfig,)).parse_args_and_config(["--config", str(yaml), "--thr_p", "0.05"])
    assert (args.thr_strategy, args.thr_p, args.thr_quantile) == ("negative-amplify", 0.05, 0.2)
    assert args.importance_sampling_level == "sequence_token"


def test_cli_rejects_unknown_strategy():
    with pytest.raises(SystemExit):
        TrlParser((THRGRPOConfig,)).parse_args_and_config(["--output_dir", "o", "--thr_strategy", "exploit"])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(per_device_train_batch_size=2, num_generations=4),
         r"per_device_train_batch_size \* steps_per_generation = 2 \* 1 = 2 is not a multiple of num_generations=4"),
        (dict(per_device_train_batch_size=1, num_generations=4, gradient_accumulation_steps=2),
         r"1 \* 2 = 2 is not a multiple"),
        (dict(per_device_train_batch_size=4, num_generations=4, eval_strategy="steps", per_device_eval_batch_size=2),
         "per_device_eval_batch_size=2 is not a multiple of num_generations_eval=4"),
    ],
)
def test_groups_split_across_processes_are_rejected(kwargs, message):
    """On 2 processes TRL accepts these layouts (whole groups globally) but a process would hold half a group."""
    with patch.object(THRGRPOConfig, "world_size", new_callable=PropertyMock, return_value=2):
        with pytest.raises(ValueError, match=message):
            config(**kwargs)
