"""The sweep inside the compiled step: an experiment that sets its optimizers' learning rate
before each `train_step`, and a callback that records each step's loss on the device."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

from .._experiment import Experiment
from .._in_step import InStep, StepData
from .._metrics import Metrics
from .._optimizer import Optimizer
from ..callbacks import Callback
from ..callbacks._lr_monitor import find_optimizers
from ._lr_finder import divergence, smooth


def _is_optimizer(x: Any) -> bool:
    return isinstance(x, Optimizer)


def with_learning_rate(experiment: Experiment, rate: Any) -> Experiment:
    """`experiment` with every `Optimizer` in it set to make its next update at `rate`."""
    return jax.tree.map(
        lambda x: x.with_learning_rate(rate) if _is_optimizer(x) else x,
        experiment,
        is_leaf=_is_optimizer,
    )


def check_sweepable(experiment: Experiment) -> None:
    """Every optimizer of `experiment` can take a learning rate per step (`TypeError`
    naming the one that cannot, and the fix, otherwise)."""
    if not isinstance(experiment, Experiment):
        raise TypeError(
            f"`lr_find` expects a `solstice.Experiment`, got `{type(experiment).__name__}`."
        )
    optimizers = find_optimizers(experiment)
    if not optimizers:
        raise TypeError(
            f"`lr_find` found no `solstice.Optimizer` in `{type(experiment).__name__}`, so "
            "there is no learning rate to sweep. Keep the optimizer as a field of the "
            "experiment (e.g. `solstice.OptaxOptimizer(...)`)."
        )
    for path, optimizer in optimizers.items():
        try:
            optimizer.with_learning_rate(jnp.float32(1.0))
        except TypeError as error:
            raise TypeError(f"`lr_find`, optimizer `{path}`: {error}") from None


class LRSweep(Experiment):
    """The experiment `lr_find` trains: before each `train_step` of `experiment`, its
    optimizers are set to `rates[step]`. Its own hooks do not run (only its steps)."""

    experiment: Experiment
    rates: Float[Array, " n"]
    step: Int[Array, ""]

    def train_step(self, batch: PyTree) -> tuple["LRSweep", Metrics]:
        rate = self.rates[jnp.minimum(self.step, self.rates.shape[0] - 1)]
        new, metrics = with_learning_rate(self.experiment, rate).train_step(batch)
        return LRSweep(new, self.rates, self.step + 1), metrics

    def eval_step(self, batch: PyTree) -> Metrics:
        return self.experiment.eval_step(batch)

    def validate_batch(self, batch: PyTree) -> None:
        self.experiment.validate_batch(batch)


class StepLosses(InStep):
    """Each training step's `monitor` metric, at index `step - 1` of a vector of
    `num_training` (NaN where no step has been)."""

    def __init__(self, monitor: str, num_training: int):
        self.monitor = monitor
        self.num_training = num_training

    def init(self, experiment: Any) -> jax.Array:
        return jnp.full((self.num_training,), jnp.nan, jnp.float32)

    def update(self, carry: jax.Array, data: StepData) -> jax.Array:
        computed = data.metrics.compute()
        if self.monitor not in computed:
            raise ValueError(
                f"`lr_find(monitor={self.monitor!r})`: the training metrics have no "
                f"{self.monitor!r}; they compute {sorted(computed)}. Pass one of them as "
                "`monitor=` (the training loss)."
            )
        loss = jnp.asarray(computed[self.monitor], jnp.float32)
        if loss.size != 1:
            raise ValueError(
                f"`lr_find(monitor={self.monitor!r})`: the metric has shape {loss.shape}; the "
                "sweep needs a scalar loss."
            )
        return carry.at[data.step - 1].set(loss.reshape(()), mode="drop")

    def __repr__(self) -> str:
        return f"StepLosses({self.monitor!r}, {self.num_training})"


class SweepRecorder(Callback):
    """Records the sweep's losses on the device; at each log interval reads them (one small
    copy) and stops the sweep once the smoothed loss diverges."""

    def __init__(self, monitor: str, num_training: int, threshold: float | None, beta: float):
        self.monitor = monitor
        self.num_training = num_training
        self.threshold = threshold
        self.beta = beta
        self.raw_losses = np.zeros(0)
        self.diverged_at: int | None = None

    def in_step(self) -> InStep:
        return StepLosses(self.monitor, self.num_training)

    def _read(self, trainer: Any) -> np.ndarray:
        return np.asarray(trainer.in_step_value(self), np.float64)[: trainer.global_step]

    def on_log(self, trainer, experiment, metrics, step) -> None:
        if self.threshold is None or self.diverged_at is not None:
            return
        if trainer.progress.stage != "train":
            return
        self.diverged_at = divergence(smooth(self._read(trainer), self.beta), self.threshold)
        if self.diverged_at is not None:
            trainer.stop(
                f"the loss diverged at step {self.diverged_at + 1} of the sweep.", by="lr_find"
            )

    def on_train_end(self, trainer, experiment) -> None:
        self.raw_losses = self._read(trainer)
