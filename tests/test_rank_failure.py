"""A THR failure on one process stops every process with the same clear error instead of a hang in a collective."""

from helpers import WORKERS, launch_two_processes


def test_failure_on_one_rank_stops_both(tiny_model_path, tmp_path):
    # Without the agreement, rank 0 would wait in the batch-quantile gather for gloo's 30-minute timeout.
    result = launch_two_processes(WORKERS / "rank_failure_run.py", tiny_model_path, tmp_path, timeout=300)
    assert result.returncode != 0
    errors = {rank: (tmp_path / f"error-rank{rank}.txt").read_text() for rank in (0, 1)}
    assert errors[1].startswith("THR failed on 1 of 2 process(es), on this process: MemoryError: planted")
    assert errors[0].startswith("THR failed on 1 of 2 process(es), on another process")
    assert "lower thr_block_elements" in errors[0]
