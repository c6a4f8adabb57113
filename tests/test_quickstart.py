"""The README's main job: `python examples/quickstart.py` reaches >= 0.95 test accuracy."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import quickstart  # noqa: E402


def test_quickstart_reaches_95_percent_on_real_digits():
    metrics = quickstart.main(["--no-progress-bar"])
    assert metrics["test/accuracy"] >= 0.95
    assert set(metrics) >= {"test/f1_macro", "test/loss", "test/balanced_accuracy"}
