"""The prepared GPU check and the step benchmark, at their tiny CPU scale, plus their measuring helpers
(`benchmarks/measure.py`) and the atomic JSON write they save results with.

The GPU check runs once on a machine we cannot retry on, so its tiny mode runs here end to end: every phase must
leave numbers or a recorded error in results.json, and a failing phase must not stop the others.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import measure  # noqa: E402

from trl_thr.files import write_json_atomically  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def finite_numbers(value):
    """Every float/int found in a nested record."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in finite_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in finite_numbers(v)]
    return []


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--scale", "tiny", "--device", "cpu",
               "--out", str(out), "--fail-phase", "environment"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), out


def test_tiny_check_records_every_phase(tiny_check):
    results, out = tiny_check
    assert results["finished"] is True
    assert set(results["phases"]) == set(gpu_check.PHASES)
    assert not list(out.glob(".*")), "a temporary results file was left behind"
    for name, phase in results["phases"].items():
        assert phase["status"] in ("ok", "error"), (name, phase)
        if phase["status"] == "error":
            assert phase["error"] and "Traceback" in phase["traceback"], name
        else:
            assert finite_numbers(phase["results"]), f"{name} recorded no numbers"


def test_forced_failure_does_not_stop_the_other_phases(tiny_check):
    phases = tiny_check[0]["phases"]
    assert phases["environment"]["status"] == "error"
    assert "forced failure" in phases["environment"]["error"]
    assert all(phases[name]["status"] == "ok" for name in gpu_check.PHASES if name != "environment"), {
        name: phases[name].get("error") for name in gpu_check.PHASES}


def test_tiny_check_measures_what_it_claims(tiny_check):
    phases = tiny_check[0]["phases"]
    kernel = phases["kernel"]["results"]
    assert kernel["lm_head_pass"].startswith("trl.kernels.ChunkedLogProbFunction")
    assert kernel["lm_head_s"]["median"] > 0 and kernel["thr_sampled_s"]["median"] > 0
    assert kernel["bound_2V'/V"] == pytest.approx(2 * sum(kernel["distinct_ids_per_group"]) / 2 / 1000)

    numerics = phases["numerics"]["results"]
    # float32 with the streamed normaliser is within round-off of float64; bf16 log-probs are further off.
    assert numerics["streamed_fp32_normaliser_vs_fp64"]["rel_l2"] < 1e-4
    assert 0 <= numerics["shipped_vs_fp64"]["weights_flipped_frac"] <= 1

    capture = phases["generate_capture"]["results"]
    assert capture["capture_method"]
    assert capture["hidden_rel_error"]["max"] < 0.1  # bf16 round-off, not a misalignment (that is O(1))

    arms = phases["trainer_step"]["results"]["arms"]
    assert "grpo" in arms and len(arms) >= 2
    scale = gpu_check.SCALES["tiny"]
    for name, arm in arms.items():
        assert len(arm["step_s"]) == scale.trainer_warmup_steps + scale.trainer_timed_steps, name
        if name != "grpo":
            assert arm["thr_calls"] and arm["thr_calls"][0]["hidden_shape"][2] == scale.hidden_size
            assert "overhead_vs_grpo_pct" in arm

    sharded = phases["sharded"]["results"]
    for kind in ("zero3", "fsdp2"):
        assert sharded[kind]["status"] in ("ok", "skipped", "error")
        assert sharded[kind].get("reason") or sharded[kind].get("error") or sharded[kind]["status"] == "ok"
    # On a CPU accelerate trains unsharded: the launch still has to have worked.
    if sharded["fsdp2"]["status"] == "skipped":
        assert sharded["fsdp2"]["unsharded_run"]["thr_calls"]


def test_bench_step_tiny(tmp_path):
    out = tmp_path / "bench_step.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--tiny", "--out", str(out)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record["finished"] is True and record["model"] == "builtin:tiny-qwen2"
    assert "load_1m" in record["load_before"] and "load_1m" in record["load_after"]
    assert record["arms"][0] == "grpo" and len(record["arms"]) >= 2
    for name in record["arms"]:
        assert record["steps"][name]["n"] == 1, name
        if name != "grpo":
            assert math.isfinite(record["steps"][name]["overhead_median_pct"])
    assert record["kernel"]["thr_sampled_over_lm_head"] > 0
    assert "| grpo |" in done.stdout and "bound 2 |V'| / V" in done.stdout


def test_write_json_atomically_replaces_whole_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomically(path, {"a": 1})
    write_json_atomically(path, {"a": 2, "nan": float("nan"), "path": tmp_path})
    record = json.loads(path.read_text())
    assert record["a"] == 2 and math.isnan(record["nan"]) and record["path"] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_cpu_peak_tensor_bytes_sees_live_tensors():
    def allocate():
        first = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB
        second = torch.empty(2_000_000, dtype=torch.float32)  # 8 MB, while the first is alive
        del first, second
        third = torch.empty(500_000, dtype=torch.float32)  # 2 MB after both are freed
        del third

    peak = measure.cpu_peak_tensor_bytes(allocate)
    assert 12_000_000 <= peak < 14_000_000


def test_thr_weight_flips_of_identical_values():
    thr = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.0, -0.4]])
    mask = torch.ones(2, 3)
    record = gpu_check.thr_weight_flips(thr, thr.clone(), torch.tensor([1.0, -1.0]), mask, 2)
    assert record["rel_l2"] == 0 and record["weights_flipped_frac"] == 0 and record["sign_agree_frac"] == 1
