"""How the benchmarks measure: wall time, peak tensor memory, CUDA host syncs and the load of the machine.

Every bench script times and measures through this module, so their numbers mean the same thing:

- `clocked` runs a function once and returns its result and seconds; `timed` repeats it after a warm-up and
  `summary` gives mean, median, spread. On CUDA both wait for the device before reading the clock.
- `step_clock` is a `transformers.TrainerCallback` that times every optimizer step of a trainer the same way.
- `peak_tensor_bytes` is the peak memory a function adds: the CUDA allocator's peak, or on a CPU the running sum of
  the torch profiler's allocation events (`cpu_peak_tensor_bytes`); `mib` turns bytes into MiB.
- `count_cuda_syncs` counts the calls of a function that make the host wait for the GPU.
- `load_averages` records how busy the machine was: times are comparable only within one run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import subprocess
import time
import warnings

import torch

# ---- time ----------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on `device` is done (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocked(fn, device: torch.device):
    """`(result, seconds)` of one call of `fn`, the device work it queued included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def summary(values: list[float]) -> dict:
    """mean, median, min, max and standard deviation of a list of seconds (empty list: all None)."""
    if not values:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None, "stdev": None}
    return {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def timed(fn, device: torch.device, repeats: int = 3) -> dict:
    """Seconds per call of `fn` after one warm-up call: `summary` of `repeats` calls."""
    clocked(fn, device)
    return summary([clocked(fn, device)[1] for _ in range(repeats)])


def step_clock(device: torch.device, before_step=None, after_step=None):
    """A `TrainerCallback` whose `seconds` lists the wall time of each optimizer step (generation included).

    `before_step()` runs at each step's start before the clock starts, `after_step(control)` at its end after the
    clock stops, so that neither is timed (`control` is the trainer's, e.g. to stop training).
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._start = None

        def on_step_begin(self, args, state, control, **kwargs):
            if before_step is not None:
                before_step()
            synchronize(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.seconds.append(time.perf_counter() - self._start)
            if after_step is not None:
                after_step(control)

    return StepClock()


# ---- memory --------------------------------------------------------------------------------------------------


def cpu_peak_tensor_bytes(fn) -> int:
    """Peak bytes of CPU tensors allocated (and not yet freed) while `fn` runs, above what existed before.

    torch allocates outside Python's allocator, so tracemalloc sees nothing. The profiler records each tensor
    allocation and free with its op; their running sum in time order is the live tensor memory `fn` added.
    Allocations freed inside the same op are not seen, so this is a lower bound on the true peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_tensor_bytes(fn, device: torch.device) -> tuple[int, str]:
    """`(peak bytes fn adds, how it was measured)`: the CUDA caching allocator's peak, or the CPU profiler's."""
    if device.type != "cuda":
        return cpu_peak_tensor_bytes(fn), "torch.profiler CPU allocations (lower bound)"
    gc.collect()
    torch.cuda.empty_cache()
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"


def mib(num_bytes: float | None) -> float | None:
    """Bytes in MiB, rounded to 0.01 (None stays None)."""
    return None if num_bytes is None else round(num_bytes / 2**20, 2)


# ---- host syncs and machine load -------------------------------------------------------------------------------


def count_cuda_syncs(fn, device: torch.device) -> int | None:
    """How many synchronising CUDA calls `fn` makes (`torch.cuda.set_sync_debug_mode`), None off CUDA."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def load_averages() -> dict:
    """1, 5 and 15 minute load averages and the `uptime` line: how busy a shared machine was."""
    record = {}
    with contextlib.suppress(OSError):
        record["load_1m"], record["load_5m"], record["load_15m"] = os.getloadavg()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        record["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    record["cpu_count"] = os.cpu_count()
    return record
