"""The cost of a training step: XLA's cost analysis of the compiled single step.

The first training call of a run records the function it called and the shapes, dtypes and
shardings of its arguments (`FirstTrainCall`, a few microseconds, once). Asked for the cost
(`Trainer.train_step_cost`), it lowers and compiles that function again for those shapes:
JAX finds the executable it already built in its cache, so this costs no XLA compile. A fused
call (`steps_per_execution > 1`) is a `lax.scan`, whose cost analysis counts the loop body
once, so for those the single-step function is analysed instead (compiled once for it).
"""

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from .._step_cost import StepCost


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _unstacked(x: Any) -> Any:
    """One step's batch leaf from a stack of `steps_per_execution` of them (its shape)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    else:
        sharding = None
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


class FirstTrainCall:
    """The first training call of a run, to analyse its cost on request.

    **Arguments:**

    - `n`: the steps the call ran; `args`: its arguments; `fn`: the function called.
    - `single`: builds the single-step function (for a fused call).
    - `gathered`: whether the batch argument is the data the step gathers from (then a
      single step takes the same argument), rather than a stack of batches.
    - `num_devices`: the devices of the Trainer's mesh.
    """

    def __init__(
        self,
        n: int,
        args: list,
        fn: Callable,
        single: Callable[[], Callable],
        gathered: bool,
        num_devices: int,
    ):
        args = jax.tree.map(_abstract, args)
        if n > 1:  # (dyn, acc, batches, reset, carries, step) of the fused call
            fn = single()
            if not gathered:
                args[2] = jax.tree.map(_unstacked, args[2])
            args = [*args, None, None]
        self.fn, self.args, self.num_devices = fn, args, num_devices
        self._cost: StepCost | None = None

    def cost(self) -> StepCost:
        """XLA's cost analysis of one step (computed once)."""
        if self._cost is None:
            analysis = self.fn.lower(*self.args).compile().cost_analysis()  # type: ignore[attr-defined]
            if isinstance(analysis, list | tuple):  # older JAX: one dict per program
                analysis = analysis[0] if analysis else {}
            analysis = analysis or {}
            flops = float(analysis.get("flops", math.nan))
            self._cost = StepCost(
                flops=flops * self.num_devices,
                flops_per_device=flops,
                bytes_accessed=float(analysis.get("bytes accessed", math.nan)),
                num_devices=self.num_devices,
            )
        return self._cost
