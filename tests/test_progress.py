"""Progress bars (models/progress.py): drawn with rate and ETA when VAS_PROGRESS says so, never
instead of the loop's own log lines, and the loops they wrap compute what they computed without."""

import os
import sys

import pytest

from models.progress import bars_enabled, decide_auto, progress_bar


def test_bars_follow_vas_progress(monkeypatch):
    monkeypatch.setenv("VAS_PROGRESS", "on")
    assert bars_enabled()
    assert progress_bar(range(2), "rank 1", enabled=False).disable          # a bar the caller turns off stays off
    monkeypatch.setenv("VAS_PROGRESS", "off")
    assert not bars_enabled()
    monkeypatch.setenv("VAS_PROGRESS", "auto")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not bars_enabled()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert bars_enabled()
    monkeypatch.setenv("VAS_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="VAS_PROGRESS must be one of auto, on, off"):
        bars_enabled()


def test_auto_is_decided_while_stderr_is_the_terminal(monkeypatch, capsys):
    """A Dagster step captures stderr (never a terminal there): the CLI decides `auto` when it starts,
    for the whole run and the processes it starts; a bad value stops it at once, clearly."""
    for terminal, decided in ((True, "on"), (False, "off")):
        monkeypatch.setenv("VAS_PROGRESS", "auto")
        monkeypatch.setattr(sys.stderr, "isatty", lambda t=terminal: t, raising=False)
        decide_auto()
        assert os.environ["VAS_PROGRESS"] == decided
        monkeypatch.setattr(sys.stderr, "isatty", lambda t=not terminal: t, raising=False)
        assert bars_enabled() is terminal                      # later, inside a captured step
    monkeypatch.setenv("VAS_PROGRESS", "off")
    decide_auto()
    assert os.environ["VAS_PROGRESS"] == "off"                 # an explicit choice stays
    from orchestration.cli import main

    monkeypatch.setenv("VAS_PROGRESS", "sometimes")
    assert main(["lineage", "data/value_models/positivity"]) == 2          # refused before it looks
    assert "VAS_PROGRESS must be one of auto, on, off" in capsys.readouterr().err


def test_a_bar_shows_count_rate_and_eta_on_stderr_and_passes_the_loop_through(monkeypatch, capsys):
    monkeypatch.setenv("VAS_PROGRESS", "on")
    assert [step * 2 for step in progress_bar(range(5), "value model (scalar)", unit="step")] == [0, 2, 4, 6, 8]
    drawn = capsys.readouterr().err
    # The bar's count of its total, its rate and its ETA (`elapsed<remaining`); a bar clears its line when done.
    assert "value model (scalar)" in drawn and "/5 [" in drawn and "step/s]" in drawn and "<" in drawn
    monkeypatch.setenv("VAS_PROGRESS", "off")
    with progress_bar(desc="sampling", total=3, unit="completion") as bar:
        bar.update(3)
    assert list(progress_bar(range(3), "quiet")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_sampling_draws_a_bar_and_the_same_tokens(monkeypatch, capsys, steering_world):
    from models.lm.sampling import SamplingConfig, sample

    world, prompts = steering_world, ["I bought this kettle", "The lamp", "So I finally got"]
    config = SamplingConfig(max_new_tokens=4, seed=0, batch_size=2)
    monkeypatch.setenv("VAS_PROGRESS", "off")
    quiet = sample(world.base, world.tokenizer, prompts, config)
    monkeypatch.setenv("VAS_PROGRESS", "on")
    drawn = sample(world.base, world.tokenizer, prompts, config)
    assert drawn.completion_ids == quiet.completion_ids
    assert "sampling" in (err := capsys.readouterr().err) and "/3 [" in err and "completion/s]" in err
