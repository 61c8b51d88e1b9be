"""THR in TRL's completions table (`log_completions=True`) and the per-group heatmap."""

import html
import math
import re
from pathlib import Path
from unittest.mock import patch

import pandas as pd
import pytest
import torch
from helpers import CPU, length_reward, tiny_dataset

from trl_thr import THRGRPOConfig, THRGRPOTrainer
from trl_thr.completion_logs import COLUMNS, completion_columns, group_heatmap_html


def test_completion_columns_by_hand():
    thr = torch.tensor([[0.5, -0.2, 0.1, 0.0], [-0.3, 0.0, 0.0, 0.0]])
    weights = torch.tensor([[1.1, 0.9, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    dominant = torch.tensor([[True, True, False, False], [False, False, False, False]])
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    columns = completion_columns(thr, weights, dominant, ids, mask, decode=lambda i: f"t{i}", top_k=2)
    assert columns["thr_dominant_frac"] == pytest.approx([2 / 3, 0.0])
    assert columns["thr_mean_weight"] == pytest.approx([2.0 / 3, 0.0])
    assert columns["thr_top_positive"] == ["'t1' +0.5, 't3' +0.1", ""]
    assert columns["thr_top_negative"] == ["'t2' -0.2", "'t5' -0.3"]
    empty = completion_columns(thr[:1], weights[:1], dominant[:1], ids[:1], torch.zeros(1, 4), decode=str)
    assert math.isnan(empty["thr_dominant_frac"][0]) and empty["thr_top_positive"] == [""]


def test_heatmap_escapes_tokens_and_colours_by_sign():
    page = group_heatmap_html([["<b>", "x"]], [[0.4, -0.2]], [1.0], prompt="1 < 2?", title="step 3")
    assert "&lt;b&gt;" in page and "<b><" not in page and "1 &lt; 2?" in page
    assert "rgba(22, 163, 74, 1.00)" in page  # the largest positive token at full strength
    assert "rgba(220, 38, 38, 0.50)" in page  # a negative token at half of the largest |THR|


def test_heatmap_scales_rows_of_each_sign_of_advantage_on_their_own():
    # the negative completion's THR is 100 times smaller: on one scale its tokens would be all but invisible
    page = group_heatmap_html([["a", "b"], ["c", "d"]], [[2.0, -1.0], [0.02, -0.01]], [0.5, -0.5])
    assert page.count("rgba(22, 163, 74, 1.00)") == 2 and page.count("rgba(220, 38, 38, 0.50)") == 2
    assert "A &gt; 0: 2; A &le; 0: 0.02" in page
    prompt_at, first_row_at = page.index('class="prompt"') if 'class="prompt"' in page else -1, page.index("A = ")
    assert prompt_at == -1 and first_row_at > 0  # no prompt given: none drawn


def train_with_completions(model_path, output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=6, max_steps=1, logging_steps=1, seed=0, log_completions=True,
                    thr_threshold="none", **CPU)
    args = THRGRPOConfig(**{**settings, **overrides})
    trainer = THRGRPOTrainer(model=model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())
    recorded = {}
    original = trainer._thr_weights_and_metrics

    def record(batch, *rest):
        weights, thr_batch = original(batch, *rest)
        recorded.update(weights=weights, mask=batch["completion_mask"])
        return weights, thr_batch

    trainer._thr_weights_and_metrics = record
    return trainer, recorded


def test_completions_table_carries_thr(tiny_model_path, tmp_path):
    trainer, recorded = train_with_completions(tiny_model_path, tmp_path)
    trainer.train()
    table = pd.read_parquet(next((tmp_path / "completions").glob("*.parquet")))
    assert set(COLUMNS) <= set(table.columns)
    mask = recorded["mask"].bool()
    expected = (recorded["weights"] * mask).sum(1) / mask.sum(1)
    assert table["thr_mean_weight"].tolist() == pytest.approx(expected.tolist())
    # threshold "none": every counted token of an active group is dominant
    assert set(table["thr_dominant_frac"].round(6)) <= {0.0, 1.0}
    heatmaps = list((tmp_path / "thr_heatmaps").glob("step_*.html"))
    assert len(heatmaps) == 1 and "THR of one group" in heatmaps[0].read_text()


def test_heatmap_shows_a_group_of_the_completions_table_under_its_step_and_prompt(tiny_model_path, tmp_path):
    from transformers import AutoTokenizer

    special = AutoTokenizer.from_pretrained(tiny_model_path).all_special_tokens

    def comparable(text):
        """Without special tokens (the table skips them) and non-ASCII characters (a character split over two tokens
        decodes to replacement characters token by token)."""
        for token in special:
            text = text.replace(token, "")
        return "".join(c for c in text if c.isascii())

    # two groups per batch: a heatmap could draw the rows of one under the prompt of the other
    trainer, _ = train_with_completions(tiny_model_path, tmp_path, max_steps=2, per_device_train_batch_size=8)
    trainer.train()
    table = pd.concat([pd.read_parquet(path) for path in sorted((tmp_path / "completions").glob("*.parquet"))])
    for path in sorted((tmp_path / "thr_heatmaps").glob("step_*.html")):
        step = int(path.stem.split("_")[1])
        with open(path, encoding="utf-8", newline="") as handle:  # a "\r" in a token stays one
            page = handle.read()
        assert f"THR of one group at step {step}</h3>" in page
        logged = table[table["step"] == step]
        assert len(logged) == 8, "the heatmap's step is not a step of the completions table"
        prompt = html.unescape(re.search(r'<div class="prompt">(.*?)</div>', page, re.S).group(1))
        group = logged[logged["prompt"] == prompt]
        assert len(group) == 4, "the prompt drawn is not the prompt of a group at that step"
        drawn = [float(a) for a in re.findall(r"<b>A = ([-+0-9.]+)</b>", page)]
        assert drawn == pytest.approx(group["advantage"].round(3).tolist(), abs=1e-3)
        rows = re.findall(r'<div class="row">(.*?)</div>', page, re.S)
        texts = ["".join(html.unescape(t) for t in re.findall(r"<span [^>]*>(.*?)</span>", row, re.S)) for row in rows]
        assert list(map(comparable, texts)) == list(map(comparable, group["completion"]))


def test_completions_table_counts_only_groups_with_a_positive_completion(tiny_model_path, tmp_path):
    """A reward threshold no completion reaches leaves every group without a positive completion: THR applies to
    none, so no token is dominant, whatever the advantages."""
    trainer, _ = train_with_completions(tiny_model_path, tmp_path, thr_positive_reward_threshold=1e9)
    trainer.train()
    table = pd.read_parquet(next((tmp_path / "completions").glob("*.parquet")))
    assert table["thr_dominant_frac"].tolist() == [0.0] * len(table)


class FakeTracker:
    """Stands in for wandb: an active run, Table and Html."""

    def __init__(self):
        self.run = object()
        self.logged = []

    class Table:
        def __init__(self, dataframe):
            self.dataframe = dataframe

    class Html:
        def __init__(self, page):
            self.page = page

    def log(self, entry):
        self.logged.append(entry)


def test_heatmap_goes_to_a_tracker_that_renders_html(tiny_model_path, tmp_path):
    tracker = FakeTracker()
    trainer, _ = train_with_completions(tiny_model_path, tmp_path)
    trainer.args.report_to = ["wandb"]  # after construction: no real wandb callback is set up
    with patch("trl.trainer.grpo_trainer.wandb", tracker, create=True):
        trainer.train()
    tables = [entry["completions"] for entry in tracker.logged if "completions" in entry]
    pages = [entry["thr/heatmap"] for entry in tracker.logged if "thr/heatmap" in entry]
    assert tables and set(COLUMNS) <= set(tables[0].dataframe.columns)
    assert len(pages) == 1 and "<span" in pages[0].page
    assert not Path(tmp_path, "thr_heatmaps").exists()


def test_the_heatmap_draws_the_rows_of_the_first_active_group(tiny_model_path, tmp_path):
    """Group 0 has no reward variance (inactive), group 1 is drawn: its rows are 2..3 (group * G), not 1..2."""
    import torch

    from trl_thr.thr_grpo_trainer import THRBatch

    trainer, _ = train_with_completions(tiny_model_path, tmp_path, max_steps=1, per_device_train_batch_size=4,
                                        num_generations=2)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]])
    mask = torch.ones(4, 3, dtype=torch.long)
    thr = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9], [1.0, 1.1, 1.2]])
    advantages = torch.tensor([0.0, 0.0, 0.5, -0.5])
    batch = {"completion_ids": ids, "prompt_ids": torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4]]),
             "prompt_mask": torch.ones(4, 2, dtype=torch.long)}
    record = THRBatch.build(thr, torch.ones(4, 3), torch.tensor([float("nan"), 0.0]), advantages, mask, 2, None, 0.1)
    assert record.active_groups.tolist() == [False, True]
    trainer._log_thr_completions(batch, record)
    heatmap = trainer._thr_heatmap
    assert heatmap["advantages"] == [0.5, -0.5]
    assert [row for rows in heatmap["thr"] for row in rows] == pytest.approx([0.7, 0.8, 0.9, 1.0, 1.1, 1.2])
    tokenizer = trainer.processing_class
    assert heatmap["prompt"] == tokenizer.decode([3, 4])
