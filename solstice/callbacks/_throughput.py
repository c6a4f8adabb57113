"""`ThroughputMonitor`: FLOPs per step from XLA's cost analysis, FLOP/s and MFU."""

import logging
from collections import Counter
from typing import Any

import equinox as eqx
import jax

from ._timer import Timer

_log = logging.getLogger("solstice")

#: Dense peak FLOP/s per device, by `device_kind` (lower case, first match wins) and
#: dtype, from the vendors' data sheets (no sparsity). "float32" is the plain FP32 rate
#: (no TF32 tensor cores); TPUs publish no float32 rate (`None`: no MFU).
PEAK_FLOPS: tuple[tuple[str, dict[str, float | None]], ...] = (
    ("h100 pcie", {"bfloat16": 756e12, "float32": 51.2e12}),
    ("h100", {"bfloat16": 989.4e12, "float32": 66.9e12}),  # SXM
    ("h200", {"bfloat16": 989.4e12, "float32": 66.9e12}),
    ("a100", {"bfloat16": 312e12, "float32": 19.5e12}),
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": None}),  # v5e
    ("tpu v5e", {"bfloat16": 197e12, "float32": None}),
    ("tpu v4", {"bfloat16": 275e12, "float32": None}),
)


def peak_flops(device: jax.Device, dtype: str) -> float | None:
    """The dense peak FLOP/s of one `device` in `dtype` (`"bfloat16"`, `"float32"`), or
    `None` where unknown (CPUs, unlisted devices)."""
    kind = device.device_kind.lower()
    for name, rates in PEAK_FLOPS:
        if name in kind:
            return rates.get(dtype)
    return None


def compute_dtype(experiment: Any) -> str:
    """The floating dtype holding most of the model's parameters (of the experiment's
    `model`, or of the whole experiment), e.g. `"float32"`."""
    tree = getattr(experiment, "model", experiment)
    counts: Counter[str] = Counter()
    for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array)):
        counts[str(x.dtype)] += x.size
    return counts.most_common(1)[0][0] if counts else "float32"


class ThroughputMonitor(Timer):
    """A `Timer` that also reports the cost of a training step and how much of the devices'
    peak it reaches.

    Besides the `Timer`'s `time/*` metrics it logs, at every training log interval:

    - `throughput/flops_per_step`: the FLOPs of one training step, from XLA's cost
      analysis of the compiled step (`StepCost.flops`: summed over the devices);
    - `throughput/flops_per_sec`: those times the interval's steps per second
      (compilation excluded);
    - `throughput/mfu`: model FLOPs utilisation, `flops_per_sec` over the peak of all
      devices, where the devices' peak is known (`PEAK_FLOPS`: H100, H200, A100, TPU v4,
      v5e, in bfloat16 and float32), or given as `peak_flops`. On a CPU, or an unlisted
      device, the peak is unknown: no MFU is logged, and the `"solstice"` logger says so
      once.

    The step's cost is read once, at the first log interval (`trainer.train_step_cost()`:
    the executable is in JAX's cache, so nothing compiles again), and kept as
    `step_cost`. XLA counts the operations the devices execute: recomputation from
    `jax.checkpoint` counts, so with it the "MFU" is what is sometimes called HFU.

    **Arguments:**

    - `dtype`: the dtype the peak is taken for (`"bfloat16"` or `"float32"`); default:
      the dtype of most of the model's parameters.
    - `peak_flops`: the peak FLOP/s of one device, overriding the table.

    **Example:**

    ```python
    monitor = ThroughputMonitor()
    trainer = solstice.Trainer(max_epochs=3, callbacks=[monitor])
    trainer.fit(experiment, datamodule)
    print(monitor.step_cost.flops, monitor.steady_samples_per_sec)
    ```
    """

    def __init__(self, dtype: str | None = None, peak_flops: float | None = None):
        super().__init__()
        if dtype not in (None, "bfloat16", "float32"):
            raise ValueError(
                f"`ThroughputMonitor(dtype={dtype!r})`: the peak FLOP/s are known for "
                "'bfloat16' and 'float32'; pass one of them, or `peak_flops=`."
            )
        if peak_flops is not None and not (isinstance(peak_flops, int | float) and peak_flops > 0):
            raise ValueError(
                f"`ThroughputMonitor(peak_flops={peak_flops!r})` must be the peak FLOP/s of "
                "one device, a positive number (e.g. `989e12` for an H100 in bfloat16)."
            )
        self.dtype = dtype
        self.peak_flops = peak_flops
        self.step_cost: Any = None  # a `solstice.StepCost`, after the first log interval
        self._peak: float | None = None

    def on_fit_start(self, trainer, experiment) -> None:
        super().on_fit_start(trainer, experiment)
        self.step_cost = None
        dtype = self.dtype or compute_dtype(experiment)
        self._peak = self.peak_flops
        if self._peak is None:
            self._peak = peak_flops(trainer.devices[0], dtype)
        if self._peak is None:
            _log.info(
                "ThroughputMonitor: the peak FLOP/s of `%s` devices in %s is not known, so "
                "no MFU is logged (pass `ThroughputMonitor(peak_flops=...)` to set it).",
                trainer.devices[0].device_kind,
                dtype,
            )

    def interval_metrics(self, trainer, steps: int, secs: float) -> dict[str, Any]:
        out = super().interval_metrics(trainer, steps, secs)
        if self.step_cost is None:
            self.step_cost = trainer.train_step_cost()
            self._mark = self._now(trainer)  # (the analysis is not the next interval's)
        if self.step_cost is None:
            return out
        flops_per_sec = self.step_cost.flops * steps / secs
        out["throughput/flops_per_step"] = self.step_cost.flops
        out["throughput/flops_per_sec"] = flops_per_sec
        if self._peak is not None:
            out["throughput/mfu"] = flops_per_sec / (self._peak * self.step_cost.num_devices)
        return out

    @property
    def mfu(self) -> float | None:
        """The steady-state MFU of the fit (see `Timer.steady_steps_per_sec`), or `None`."""
        if self.step_cost is None or self._peak is None or not self.steady_steps_per_sec:
            return None
        flops_per_sec = self.step_cost.flops * self.steady_steps_per_sec
        return flops_per_sec / (self._peak * self.step_cost.num_devices)
