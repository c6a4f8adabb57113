"""examples/fsdp_sharding.py runs end to end (its own process: it forces 4 CPU devices)."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp_sharding.py"


def test_fsdp_example_matches_replicated_training():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "1", "--width", "64", "--min-size", "1024"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "P(None, 'batch')" in out.stdout  # the (64, 64) weights are split
    accuracy = [line for line in out.stdout.splitlines() if line.startswith("test/accuracy")]
    assert len(accuracy) == 1 and "replicated" in accuracy[0] and "sharded" in accuracy[0]
