"""examples/lr_sweep.py: 8 learning rates as one `Population`, its smoke run through `main`."""

import importlib.util
import math
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lr_sweep.py"


def test_lr_sweep_smoke_reports_every_rate_and_the_best(capsys):
    spec = importlib.util.spec_from_file_location("lr_sweep", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lr_sweep"] = module
    spec.loader.exec_module(module)
    metrics = module.main(["--smoke"])
    losses = [metrics[f"val/member_{i}/loss"] for i in range(8)]
    assert all(math.isfinite(x) for x in losses)
    assert len(set(losses)) == 8  # same initialisation, different rates
    assert "val/member_8/loss" not in metrics and "val/population/mean/loss" in metrics
    # the best rate is the one with the lowest validation loss (one validation in the smoke)
    assert metrics["best_lr"] == module.np.geomspace(1e-4, 1e-1, 8)[losses.index(min(losses))]
    assert "best learning rate" in capsys.readouterr().out
