"""benchmarks/image_throughput.py runs end to end in smoke mode, data-parallel over 2 devices
(its own process), and its contestants train the same thing."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "image_throughput.py"
# Two narrow stages, 8 steps of 32 images per epoch, 2 rounds: compiling is most of the time.
ARGS = ("--smoke", "--samples", "256", "--batch-size", "32")
CONTESTANTS = (
    "hand-written sharded loop",
    "hand-written loop, loss only",
    "solstice fit",
    "solstice fit (host data)",
)


def test_image_throughput_smoke():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT), *ARGS],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "devices: 2 x cpu (cpu)" in text
    report = text.split("samples/cpu-s", 1)[1]
    for name in CONTESTANTS:
        assert re.search(rf"^{re.escape(name)}\s+[0-9.]+ s", report, re.MULTILINE), name
    headline = re.search(r"^solstice fit / hand-written sharded loop\s+([0-9.]+)x", text, re.M)
    assert headline is not None and math.isfinite(float(headline.group(1)))
    assert float(headline.group(1)) > 0
    same = re.search(r"^same training: .*: (.*)$", text, re.MULTILINE)
    assert same is not None
    distances = dict(cell.rsplit(" ", 1) for cell in same.group(1).split("; "))
    assert set(distances) == set(CONTESTANTS[1:])
    assert all(float(d) < 1e-5 for d in distances.values()), distances
    assert "RESULT 2 x cpu (cpu), resnet18 float32 batch 32" in text
