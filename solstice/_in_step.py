"""In-step reductions: a callback's own computation inside the compiled training step.

A callback that needs a value of every step (whether any was not finite, a norm) cannot
read it from the device per step without stalling training. Instead it declares an `InStep`
(`Callback.in_step`): the Trainer carries its state through the compiled step, updates it
at every step on the device, keeps it in checkpoints, and hands it over on request
(`trainer.in_step_value(callback)`), e.g. at log intervals (Levanter's
`JitCallback.inside_step`).
"""

import abc
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._metrics import Metrics
from ._optimizer_tap import OptimizerCall


class StepData(NamedTuple):
    """What an `InStep` sees of one training step (traced values).

    - `metrics`: the `Metrics` the step returned.
    - `batch`: the batch `train_step` received (with `accumulate_grad_batches`: the step's
      microbatches as `train_step` received them, stacked `(m, batch...)`).
    - `step`: the global step just taken, counting from 1 (an int32 scalar).
    - `experiment`: the experiment `train_step` returned (the one the next step starts from).
    - `previous`: the experiment the step started from.
    - `optimizer_calls`: for each `solstice.Optimizer` of the experiment (in tree order), the
      gradients, parameters and updates of its call in this step (`OptimizerCall`); filled
      only for in-step reductions that declare `uses_optimizer_calls = True`, else `()`.
    """

    metrics: Metrics
    batch: PyTree
    step: jax.Array
    experiment: Any = None
    previous: Any = None
    optimizer_calls: tuple[OptimizerCall, ...] = ()


class InStep(abc.ABC):
    """A reduction computed inside the compiled training step.

    **Example:**

    ```python
    class MaxLoss(InStep):
        def init(self, experiment):
            return jnp.asarray(-jnp.inf, jnp.float32)

        def update(self, carry, data):
            return jnp.maximum(carry, data.metrics.compute()["loss"])
    ```
    """

    #: Whether `update` reads `StepData.optimizer_calls`: the Trainer then taps the
    #: experiment's optimizers in the compiled step (see `solstice._optimizer_tap`); an
    #: experiment without a `solstice.Optimizer`, or one whose optimizer is not called, is
    #: reported when the step is traced.
    uses_optimizer_calls: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, experiment: Any) -> PyTree:
        """The initial state, for a run that starts from `experiment` (so that a state may
        be shaped like its arrays, e.g. an average of its weights): a pytree of arrays. The
        Trainer places a copy on every device, so it may hold arrays of `experiment`."""

    @abc.abstractmethod
    def update(self, carry: PyTree, data: StepData) -> PyTree:
        """Traced, once per training step: the new state from the old one and the step."""


class FirstNonFinite(InStep):
    """The first step (counting from 1) whose metrics, and with `inputs=True` whose batch,
    held NaN or inf; -1 while there is none. An int32 scalar.

    **Arguments:**

    - `inputs`: also check every floating leaf of the batch.
    """

    def __init__(self, inputs: bool = False):
        self.inputs = inputs

    def init(self, experiment: Any) -> jax.Array:
        return jnp.asarray(-1, jnp.int32)

    def update(self, carry: jax.Array, data: StepData) -> jax.Array:
        trees = (data.metrics, data.batch) if self.inputs else (data.metrics,)
        checks = [
            jnp.all(jnp.isfinite(x))
            for x in jax.tree.leaves(trees)
            if jnp.issubdtype(x.dtype, jnp.inexact)
        ]
        if not checks:
            return carry
        finite = jnp.all(jnp.stack(checks))
        return jnp.where((carry < 0) & ~finite, data.step, carry)

    def __repr__(self) -> str:
        return f"FirstNonFinite(inputs={self.inputs})"
