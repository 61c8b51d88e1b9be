"""`trl-thr eval`: the Pass@K estimator, scoring, an end-to-end run, resuming, comparing, and the vLLM path."""

import itertools
import json
import sys
import types
from fractions import Fraction
from math import comb
from unittest.mock import patch

import pytest

from trl_thr import pass_at_k
from trl_thr.cli.commands import eval as eval_script
from trl_thr.cli import main as cli_main
from trl_thr.cli.errors import UsageError
from trl_thr.cli.evaluation import FileHashes, GenerationCache, check_ks, model_fingerprint, score


def brute_force_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) that contain a correct sample."""
    correct = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(correct[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    for n, c, k in [(256, 1, 1), (256, 3, 128), (256, 100, 200), (1024, 7, 512)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 7, 4) == 1.0  # n - c = 3 < k: every 4-subset holds a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((4, 1, 5), ValueError, r"k must be in \[1, n=4\]"),
        ((4, 1, 0), ValueError, r"k must be in \[1, n=4\]"),
        ((4, 5, 1), ValueError, r"c must be in \[0, n=4\]"),
        ((0, 0, 1), ValueError, "n must be >= 1"),
        ((4.0, 1, 1), TypeError, "n must be an int"),
    ],
)
def test_pass_at_k_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        pass_at_k(*args)


def test_check_ks():
    assert check_ks([4, 1, 4, 2], 4) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"k_values \[8\] must be in \[1, n_samples=4\].*Raise n_samples to 8"):
        check_ks([1, 8], 4)


def test_scoring_by_hand():
    records = [
        {"samples": ["\\boxed{4}", "\\boxed{5}", "4", "\\boxed{4.0}"], "greedy": "\\boxed{4}"},  # 2 of 4 correct
        {"samples": ["\\boxed{1}"] * 4, "greedy": "no"},  # none correct
        {"samples": ["\\boxed{1}"] * 4, "greedy": "\\boxed{1}"},  # gold does not parse: ungradable
    ]
    result = score(["q0", "q1", "q2"], ["4", "7", ""], records, [1, 2, 4], lenient=False)
    metrics = result["metrics"]
    assert metrics["problems"] == 3 and metrics["ungradable"] == 1
    assert metrics["greedy_accuracy"] == 0.5
    assert metrics["mean@4"] == pytest.approx((0.5 + 0) / 2)
    assert metrics["pass@1"] == pytest.approx(0.25)
    assert metrics["pass@2"] == pytest.approx((1 - comb(2, 2) / comb(4, 2)) / 2)
    assert metrics["pass@4"] == pytest.approx(0.5)
    first = result["problems"][0]
    assert [s["correct"] for s in first["samples"]] == [True, False, False, True]
    assert first["samples"][2]["answer"] is None and first["num_correct"] == 2
    assert score(["q"], ["4"], [{"samples": ["so 4"]}], [1], lenient=True)["metrics"]["pass@1"] == 1.0


@pytest.fixture
def benchmark_file(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [{"problem": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def eval_args(model, benchmark, output_dir, *extra):
    return ["--model_name_or_path", model, "--benchmark", benchmark, "--n_samples", "4", "--k_values", "1", "2",
            "4", "--max_new_tokens", "6", "--prompt_template", "chat-boxed", "--output_dir", str(output_dir),
            "--run_name", "tiny", *extra]


def test_end_to_end_on_a_local_file(tiny_model_path, benchmark_file, tmp_path, capsys):
    (result,) = eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path))
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["metrics"] == result["metrics"]
    assert set(saved["metrics"]) >= {"greedy_accuracy", "mean@4", "pass@1", "pass@2", "pass@4"}
    assert len(saved["problems"]) == 5 and all(len(p["samples"]) == 4 for p in saved["problems"])
    assert saved["config"]["template"]["name"] == "chat-boxed" and saved["config"]["backend"] == "transformers"
    assert (tmp_path / "tiny.png").stat().st_size > 5_000
    assert "| pass@4 (%) |" in (tmp_path / "tiny.md").read_text()
    assert "pass@2" in capsys.readouterr().out


def test_results_of_two_models_saved_as_model_are_not_confused(tiny_model_path, benchmark_file, tmp_path):
    """A study saves every run's model as runs/<run>/model: a result is named by its run by default, and a result is
    never silently replaced by another model's under the same name."""
    import shutil

    from trl_thr.cli.errors import UsageError
    from trl_thr.tiny import build_tiny_model

    shutil.copytree(tiny_model_path, tmp_path / "runs" / "grpo-s0" / "model")
    build_tiny_model(tmp_path / "runs" / "grpo-s1" / "model", seed=1)
    unnamed = eval_args(str(tmp_path / "runs" / "grpo-s0" / "model"), benchmark_file, tmp_path / "out")[:-2]
    eval_script.main(unnamed)
    assert (tmp_path / "out" / "grpo-s0-model-bench.json").exists()
    eval_script.main(unnamed)  # the same model again: its result is replaced by the same
    other = eval_args(str(tmp_path / "runs" / "grpo-s1" / "model"), benchmark_file, tmp_path / "out")[:-2]
    with pytest.raises(UsageError, match=r"grpo-s0-model-bench.json holds the results of another model \(.*grpo-s0"
                                         r"/model\); set --run_name to name this one, or use another output_dir"):
        eval_script.main([*other, "--run_name", "grpo-s0-model-bench"])


def recording(make_generate, seeds, stop_after=None):
    """Wrap `make_generate` so its generator records problem seeds; KeyboardInterrupt on problem `stop_after`."""

    def wrapped_make_generate(*args, **kwargs):
        generate, tokenizer, dtype = make_generate(*args, **kwargs)

        def generate_and_record(prompt, num_samples, temperature, seed):
            if seed not in seeds and stop_after is not None and len(set(seeds)) == stop_after:
                raise KeyboardInterrupt
            seeds.append(seed)
            return generate(prompt, num_samples, temperature, seed)

        return generate_and_record, tokenizer, dtype

    return wrapped_make_generate


def test_lora_adapter_on_a_base_model(tiny_model_path, benchmark_file, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(tmp_path / "adapter")
    base = eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path / "base"))[0]
    adapted = eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path / "lora",
                                         "--adapter_name_or_path", str(tmp_path / "adapter")))[0]
    assert adapted["config"]["adapter"] == str(tmp_path / "adapter")
    assert [p["samples"] for p in adapted["problems"]] != [p["samples"] for p in base["problems"]]


def test_resume_after_interruption(tiny_model_path, benchmark_file, tmp_path):
    full = eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path / "full"))[0]

    seeds = []
    with patch.object(eval_script, "make_generate", recording(eval_script.make_generate, seeds, stop_after=2)):
        with pytest.raises(KeyboardInterrupt):
            eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path / "cut"))
    (cache,) = (tmp_path / "cut" / "cache").glob("*.jsonl")
    assert len(cache.read_text().splitlines()) == 2

    seeds.clear()
    with patch.object(eval_script, "make_generate", recording(eval_script.make_generate, seeds)):
        resumed = eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path / "cut"))[0]
    assert sorted(set(seeds)) == [2, 3, 4]  # only problems missing from the cache (problem i uses seed 0 + i)
    assert [p["samples"] for p in resumed["problems"]] == [p["samples"] for p in full["problems"]]
    assert resumed["metrics"] == full["metrics"]


def test_interrupted_eval_says_what_it_kept(tiny_model_path, benchmark_file, tmp_path, capsys):
    seeds = []
    with patch.object(eval_script, "make_generate", recording(eval_script.make_generate, seeds, stop_after=2)):
        code = cli_main(["eval", *eval_args(tiny_model_path, benchmark_file, tmp_path)])
    assert code == 130
    (cache,) = (tmp_path / "cache").glob("*.jsonl")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"trl-thr eval: interrupted: the generations of 2 finished problems are kept in {cache}; rerun "
                    "the same command to resume from them.")


def copy_model(source, target):
    import shutil

    shutil.copytree(source, target)
    return str(target)


def retrain_in_place(model_dir, seed):
    """Save other weights into the same directory, as a new checkpoint written over the old one would."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    model.save_pretrained(model_dir)


def test_cache_follows_the_weights_not_the_path(tiny_model_path, benchmark_file, tmp_path, capsys):
    model = copy_model(tiny_model_path, tmp_path / "model")
    first = eval_script.main(eval_args(model, benchmark_file, tmp_path / "out"))[0]
    assert "Reusing" not in capsys.readouterr().out
    again = eval_script.main(eval_args(model, benchmark_file, tmp_path / "out"))[0]
    assert "Reusing cached generations for 5 of 5 problems" in capsys.readouterr().out
    assert again["problems"] == first["problems"]

    retrain_in_place(model, seed=1)
    changed = eval_script.main(eval_args(model, benchmark_file, tmp_path / "out"))[0]
    assert "Reusing" not in capsys.readouterr().out
    fresh = eval_script.main(eval_args(model, benchmark_file, tmp_path / "fresh"))[0]
    assert [p["samples"] for p in changed["problems"]] == [p["samples"] for p in fresh["problems"]]
    assert [p["samples"] for p in changed["problems"]] != [p["samples"] for p in first["problems"]]
    weights = changed["config"]["weights"]["model.safetensors"]
    assert weights["sha256"] != first["config"]["weights"]["model.safetensors"]["sha256"]
    assert weights["bytes"] == (tmp_path / "model" / "model.safetensors").stat().st_size


def test_dtype_and_settings_are_keyed_and_recorded(tiny_model_path, benchmark_file, tmp_path):
    auto = eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path))[0]
    float32 = eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path, "--dtype", "float32"))[0]
    # `auto` is recorded as what it ran: the float32 checkpoint's float32, whose samples float32 then reuses
    assert (auto["config"]["dtype"], float32["config"]["dtype"]) == ("float32", "float32")
    assert len(list((tmp_path / "cache").glob("*.jsonl"))) == 1
    bfloat16 = eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path, "--dtype", "bfloat16"))[0]
    assert len(list((tmp_path / "cache").glob("*.jsonl"))) == 2  # bfloat16 did not reuse float32's samples
    assert bfloat16["config"]["dtype"] == "bfloat16"
    config = float32["config"]
    assert {"backend", "template", "temperature", "top_p", "seed", "max_new_tokens", "n", "batch_size",
            "problems_digest", "weights", "adapter_weights"} <= set(config)
    assert config["weights"]["config.json"]["sha256"] and config["adapter_weights"] is None


def test_file_hashes_are_memoised_per_size_and_mtime(tiny_model_path, tmp_path):
    import os

    model = copy_model(tiny_model_path, tmp_path / "model")
    first = FileHashes(tmp_path / "hashes.json")
    fingerprint = model_fingerprint(model, first)
    assert first.hashed == len(fingerprint) and "model.safetensors" in fingerprint
    memoised = FileHashes(tmp_path / "hashes.json")
    assert model_fingerprint(model, memoised) == fingerprint and memoised.hashed == 0
    weights = tmp_path / "model" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    touched = FileHashes(tmp_path / "hashes.json")
    assert model_fingerprint(model, touched) == fingerprint and touched.hashed == 1  # same content, read again


def test_a_truncated_last_cache_line_is_repaired(tmp_path):
    path = tmp_path / "cache.jsonl"
    whole = json.dumps({"index": 0, "samples": ["a"]}) + "\n"
    path.write_text(whole + json.dumps({"index": 1, "samples": ["b"]})[:12])  # killed mid-write
    cache = GenerationCache(path)
    assert sorted(cache.done) == [0]
    cache.add({"index": 1, "samples": ["b2"]})
    reopened = GenerationCache(path)
    assert sorted(reopened.done) == [0, 1] and reopened.done[1]["samples"] == ["b2"]
    assert path.read_text() == whole + json.dumps({"index": 1, "samples": ["b2"]}) + "\n"
    assert cache.repaired and not reopened.repaired


def test_compare_runs(tmp_path):
    def fake(name, values):
        return {"config": {"run_name": name, "benchmark": "aime24", "model": f"runs/{name}-s0/model",
                           "adapter": "adapters/thr-neg" if name == "thr-neg" else None},
                "metrics": {"problems": 30, "ungradable": 0, "greedy_accuracy": values[0],
                            **{f"pass@{k}": v for k, v in zip([1, 8, 64], values)}}}

    paths = []
    for name, values in (("grpo", [0.2, 0.5, 0.7]), ("thr-neg", [0.21, 0.55, 0.77])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(fake(name, values)))
        paths.append(str(path))
    results = eval_script.main(["--compare", *paths, "--output_dir", str(tmp_path / "out")])
    assert [r["config"]["run_name"] for r in results] == ["grpo", "thr-neg"]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| metric | grpo | thr-neg |" in table and "| pass@64 (%) | 70.0 | 77.0 |" in table
    assert "| model | runs/grpo-s0/model | runs/thr-neg-s0/model + adapters/thr-neg |" in table
    assert (tmp_path / "out" / "compare.png").stat().st_size > 5_000


def test_compare_warns_about_different_settings_and_names_runs_uniquely(tmp_path, capsys):
    def fake(temperature, digest):
        return {"config": {"run_name": "grpo", "benchmark": "aime24", "n": 8, "temperature": temperature,
                           "problems_digest": digest},
                "metrics": {"problems": 30, "ungradable": 0, "pass@1": temperature / 2}}

    paths = []
    for folder, temperature, digest in (("a", 1.0, "d1"), ("b", 0.6, "d2")):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "grpo.json"
        path.write_text(json.dumps(fake(temperature, digest)))
        paths.append(str(path))
    eval_script.main(["--compare", *paths, paths[0], "--output_dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    labels = [f"grpo ({paths[0]}) #1", f"grpo ({paths[1]})", f"grpo ({paths[0]}) #2"]
    assert "| metric | " + " | ".join(labels) + " |" in captured.out
    assert "Warning: these runs differ in problems_digest, temperature" in captured.err
    assert "| temperature | 1.0 | 0.6 | 1.0 |" in captured.err
    assert "| problem set (digest) | d1 | d2 | d1 |" in captured.err
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| temperature | 1.0 | 0.6 | 1.0 |" in table and "| n |" not in table


class FakeVLLM:
    """A stand-in for the `vllm` module: LLM.generate returns canned outputs, correct for even seeds."""

    class SamplingParams:
        def __init__(self, n, temperature, top_p, max_tokens, seed):
            self.n, self.temperature, self.seed = n, temperature, seed

    class LLM:
        built = []  # (model, engine kwargs) of every engine built

        def __init__(self, model, seed, **kwargs):
            self.kwargs = kwargs
            FakeVLLM.LLM.built.append((model, kwargs))

        def generate(self, prompts, params, use_tqdm=False):
            gold = prompts[0].split("What is ")[1].split(" +")[0]
            text = f"\\boxed{{{2 * int(gold)}}}" if params.seed % 2 == 0 else "\\boxed{0}"
            outputs = [types.SimpleNamespace(text=text, token_ids=[1, 2]) for _ in range(params.n)]
            return [types.SimpleNamespace(outputs=outputs)]


def test_vllm_backend_path(tiny_model_path, benchmark_file, tmp_path):
    with patch.dict(sys.modules, {"vllm": FakeVLLM}), patch("trl.import_utils.is_vllm_available", lambda: True), \
            patch("trl_thr._trl_compat.vllm_runs_on_cpu", lambda: False):  # vLLM on a GPU platform
        (result,) = eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path, "--backend", "vllm"))
    assert result["config"]["backend"] == "vllm"
    assert result["metrics"]["pass@4"] == pytest.approx(3 / 5)  # problems 0, 2, 4 (even seeds) are right


def test_vllm_on_a_cpu_runs_the_checkpoints_dtype_and_a_builtin_model_in_its_vllm_width(tiny_model_path,
                                                                                         benchmark_file, tmp_path,
                                                                                         monkeypatch, capsys):
    """vLLM's `auto` would run a float32 checkpoint in bfloat16 on its CPU platform: the checkpoint's dtype is asked
    for and recorded; `builtin:tiny-qwen2` is built head_dim 64 as training builds it; and a comparison with a
    transformers result of another dtype is flagged."""
    import trl_thr._trl_compat  # noqa: F401 - TRL checks vLLM's version when first imported: before it is faked

    monkeypatch.setenv("TRL_THR_CACHE", str(tmp_path / "cache"))
    FakeVLLM.LLM.built.clear()
    with patch.dict(sys.modules, {"vllm": FakeVLLM}), patch("trl.import_utils.is_vllm_available", lambda: True), \
            patch("trl_thr._trl_compat.vllm_runs_on_cpu", lambda: True):
        (result,) = eval_script.main(eval_args("builtin:tiny-qwen2", benchmark_file, tmp_path / "v", "--backend",
                                               "vllm", "--run_name", "v"))
    ((model, engine),) = FakeVLLM.LLM.built
    assert model.endswith("tiny-qwen2-vllm") and engine["dtype"] == "float32" and engine["enforce_eager"]
    assert result["config"]["dtype"] == "float32" and result["config"]["backend"] == "vllm"
    (other,) = eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path / "t", "--dtype", "bfloat16",
                                          "--run_name", "t"))
    assert other["config"]["dtype"] == "bfloat16" and other["config"]["backend"] == "transformers"
    capsys.readouterr()
    eval_script.main(["--compare", str(tmp_path / "v" / "v.json"), str(tmp_path / "t" / "t.json"),
                      "--output_dir", str(tmp_path / "c")])
    error = capsys.readouterr().err
    assert "these runs differ in" in error and "backend" in error and "dtype" in error


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--k_values", "1", "32"], r"k_values \[32\] must be in \[1, n_samples=4\]"),
        (["--backend", "vllm"], r'pip install "trl-thr\[vllm\]"'),
        (["--prompt_template", "nope"], "neither a template name"),
        (["--k_values", "0", "1"], "k_values must be >= 1"),
        (["--batch_size", "0"], "batch_size must be >= 1"),
        (["--max_problems", "0"], "max_problems must be >= 1"),
        (["--temperature", "-1"], "temperature must be >= 0"),
    ],
)
def test_eval_usage_errors(argv, message, tiny_model_path, benchmark_file, tmp_path):
    with pytest.raises(UsageError, match=message):
        eval_script.main(eval_args(tiny_model_path, benchmark_file, tmp_path) + argv)


def test_eval_unknown_model_path(benchmark_file, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UsageError, match=f"^model {missing}: not found \\(no such directory\\)"):
        eval_script.main(eval_args(str(missing), benchmark_file, tmp_path))
    with pytest.raises(UsageError, match="model outputs/no-such-run: not found .*HF_HUB_OFFLINE=1"):
        eval_script.main(eval_args("outputs/no-such-run", benchmark_file, tmp_path))


def test_eval_needs_a_model_or_results():
    with pytest.raises(UsageError, match="set model_name_or_path and benchmark, or give result files"):
        eval_script.main([])
