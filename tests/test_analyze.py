"""`trl-thr analyze`: statistics on hand-made groups, the HTML report (structure, colours, rendering), end to end."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from unittest.mock import patch

import pytest
import torch

from trl_thr.cli.analysis import build_batch, html_report, thr_statistics, top_tokens
from trl_thr.completion_logs import NEGATIVE_RGB, POSITIVE_RGB, token_colour
from trl_thr.cli.errors import UsageError
from trl_thr.cli.commands import analyze as analyze_script


def hand_batch():
    """Two groups of 2: group 0 has a correct and an incorrect completion, group 1 only incorrect ones."""
    batch = build_batch(
        prompt_ids=[[5, 6], [5, 6], [7], [7]],
        completion_ids=[[10, 11, 12], [10, 13], [14], [15, 16]],
        rewards=[1.0, 0.0, 0.0, 0.0],
        correct=[True, False, False, False],
        num_generations=2,
        pad_id=0,
    )
    thr = torch.tensor([[3.0, 1.0, -0.5], [-2.0, 0.25, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    entropy = torch.tensor([[2.0, 0.1, 0.2], [1.5, 0.3, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    return batch, thr, entropy


def test_build_batch_pads_like_trl():
    batch, _, _ = hand_batch()
    assert batch.prompt_ids[2].tolist() == [0, 7] and batch.prompt_mask[2].tolist() == [0, 1]
    assert batch.completion_ids[1].tolist() == [10, 13, 0] and batch.completion_mask[1].tolist() == [1, 1, 0]
    assert batch.advantages[0] > 0 > batch.advantages[1] and batch.advantages[2:].abs().sum() == 0


def test_statistics_by_hand():
    batch, thr, entropy = hand_batch()
    stats = thr_statistics(thr, entropy, batch, quantiles=(0.4,), tau=0.9, overlap_quantile=0.4)
    assert (stats["groups"], stats["active_groups"], stats["active_tokens"], stats["tokens"]) == (2, 1, 5, 8)
    # anchor: tau = mean THR of the correct completion = (3 + 1 - 0.5) / 3 = 7/6 -> |THR| > 7/6: 3.0 and -2.0
    assert stats["dominant_fraction"]["anchor"] == pytest.approx(2 / 5)
    assert stats["dominant_fraction"]["quantile_0.4"] == pytest.approx(2 / 5)
    assert stats["dominant_fraction"]["absolute_0.9"] == pytest.approx(3 / 5)  # 3.0, 1.0, -2.0
    correct, incorrect = stats["by_correctness"]["correct"], stats["by_correctness"]["incorrect"]
    assert correct["tokens"] == 3 and correct["positive_frac"] == pytest.approx(2 / 3)
    assert incorrect["tokens"] == 2 and incorrect["negative_frac"] == pytest.approx(0.5)
    assert incorrect["mean_thr"] == pytest.approx(-0.875)
    # top 40 % of 5 active tokens = 2 tokens: by |THR| {3.0, -2.0}, by entropy {2.0, 1.5}: the same tokens
    overlap = stats["entropy_overlap"]
    assert overlap["high_thr_tokens"] == 2 and overlap["overlap_frac"] == 1.0
    # the training metric's definition: of the 2 dominant tokens (anchor), those with entropy >= the 0.6 quantile
    assert overlap["dominant_tokens"] == 2 and overlap["dominant_share"] == 1.0
    assert overlap["per_group"]["dominant_share"] == {"groups": 1}  # one active group: no interval


def test_top_tokens_with_context():
    batch, thr, _ = hand_batch()
    top = top_tokens(thr, batch, decode=lambda ids: " ".join(map(str, ids)), count=2, context=1)
    assert [t["thr"] for t in top["positive"]] == [3.0, 1.0] and [t["thr"] for t in top["negative"]] == [-2.0, -0.5]
    assert top["positive"][1] == {"thr": 1.0, "row": 0, "position": 1, "token": "11", "before": "10", "after": "12",
                                  "correct": True}
    assert top["negative"][0]["after"] == "13" and not top["negative"][0]["correct"]


class Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tokens, self.tags, self.external = [], set(), []
        self.completions = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if any(str(v).startswith(("http:", "https:", "//")) for k, v in attrs.items() if k in ("src", "href")):
            self.external.append(attrs)
        if tag == "span" and "data-thr" in attrs:
            self.tokens.append((float(attrs["data-thr"]), attrs["style"]))
        if tag == "div" and "data-correct" in attrs:
            self.completions.append(attrs["data-correct"])


def rgba(style):
    red, green, blue, alpha = re.search(r"rgba\((\d+), (\d+), (\d+), ([\d.]+)\)", style).groups()
    return (int(red), int(green), int(blue)), float(alpha)


def test_html_report_structure_and_colours():
    batch, thr, entropy = hand_batch()
    stats = thr_statistics(thr, entropy, batch)
    decode = lambda ids: "<tok&" + " ".join(map(str, ids)) + ">"  # noqa: E731 - must be escaped
    page = html_report(batch, thr, decode, ["prompt <0>", "prompt 1"], stats, top_tokens(thr, batch, decode), "T")
    parser = Spans()
    parser.feed(page)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not parser.external and not parser.tags & {"script", "link", "img", "iframe"}
    assert len(parser.tokens) == int(batch.completion_mask.sum())  # one span per real token, none for padding
    assert parser.completions == ["true", "false", "false", "false"]
    assert "&lt;tok&amp;10&gt;" in page and "prompt &lt;0&gt;" in page
    for value, style in parser.tokens:
        colour, alpha = rgba(style)
        if value > 0:
            assert colour == POSITIVE_RGB
        elif value < 0:
            assert colour == NEGATIVE_RGB
        else:
            assert alpha == 0
    by_magnitude = sorted((abs(v), rgba(s)[1]) for v, s in parser.tokens)
    assert all(a1 <= a2 for (_, a1), (_, a2) in zip(by_magnitude, by_magnitude[1:]))  # opacity grows with |THR|


def test_token_colour_saturates():
    assert rgba(token_colour(5.0, 2.0)) == (POSITIVE_RGB, 1.0)
    assert rgba(token_colour(-1.0, 2.0)) == (NEGATIVE_RGB, 0.5)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    from matplotlib.image import imread

    batch, thr, entropy = hand_batch()
    stats = thr_statistics(thr, entropy, batch)
    page = html_report(batch, thr, lambda ids: "WWWW", ["p0", "p1"], stats, {"positive": [], "negative": []}, "T")
    (tmp_path / "report.html").write_text(page)
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,1400", f"--screenshot={shot}",
                    f"file://{tmp_path / 'report.html'}"], capture_output=True, timeout=120, check=True)
    pixels = (imread(shot)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    for colour in (POSITIVE_RGB, NEGATIVE_RGB):  # the strongest tokens are drawn at full opacity
        assert (abs(pixels - torch.tensor(colour).numpy()).max(axis=1) <= 3).sum() > 50, colour


def fake_grade(text, gold, lenient=False):  # patched where the accuracy reward looks it up
    """Correct when the completion's length is even: gives groups with both outcomes on a random model."""
    return len(text) % 2 == 0


def test_analyze_end_to_end(tiny_model_path, tmp_path):
    argv = ["--model_name_or_path", tiny_model_path, "--dataset_name", "arithmetic", "--num_samples", "12",
            "--num_prompts", "4", "--num_generations", "4", "--max_new_tokens", "12", "--prompt_template",
            "chat-boxed", "--output_dir", str(tmp_path), "--top_tokens", "5"]
    with patch("trl_thr.cli.rewards.grade", fake_grade):
        record = analyze_script.main(argv)
    stats = record["statistics"]
    assert stats["groups"] == 4 and stats["active_groups"] >= 1
    assert set(stats["dominant_fraction"]) == {"anchor", "quantile_0.1", "quantile_0.2", "quantile_0.5", "none"}
    assert 0 <= stats["entropy_overlap"]["overlap_frac"] <= 1
    assert len(record["top_tokens"]["positive"]) <= 5 and record["config"]["template"]["name"] == "chat-boxed"
    saved = json.loads((tmp_path / "thr_analysis.json").read_text())
    assert saved["statistics"] == json.loads(json.dumps(stats))
    assert (tmp_path / "thr_histogram.png").stat().st_size > 5_000
    parser = Spans()
    parser.feed((tmp_path / "thr_report.html").read_text())
    assert len(parser.completions) == 16 and parser.tokens


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "set model_name_or_path and dataset_name"),
        (["--model_name_or_path", "m", "--dataset_name", "arithmetic", "--num_generations", "1"],
         "num_generations must be >= 2"),
        (["--model_name_or_path", "m", "--dataset_name", "arithmetic", "--overlap_quantile", "0"],
         r"overlap_quantile must be in \(0, 1\]"),
        (["--model_name_or_path", "m", "--dataset_name", "a", "--colour", "x"], "unknown argument"),
        (["--model_name_or_path", "m", "--dataset_name", "arithmetic", "--num_prompts", "0"],
         "num_prompts must be >= 1"),
    ],
)
def test_analyze_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        analyze_script.main(argv)
