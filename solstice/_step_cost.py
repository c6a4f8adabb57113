"""`StepCost`: what XLA's cost analysis says one training step costs."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class StepCost:
    """The cost of one training step, from XLA's cost analysis of the compiled step
    (`jax.jit(...).lower(...).compile().cost_analysis()`).

    - `flops`: floating-point operations of one step, summed over the devices (XLA
      analyses the program each device runs: `flops_per_device` times `num_devices`).
    - `flops_per_device`: those of one device's program.
    - `bytes_accessed`: the bytes one device's program reads and writes.
    - `num_devices`: the devices the step runs on.

    These are the operations the devices execute: recomputation (`jax.checkpoint`) is
    counted, and a replicated computation (e.g. the optimizer update under data
    parallelism) is counted once per device.
    """

    flops: float
    flops_per_device: float
    bytes_accessed: float
    num_devices: int
