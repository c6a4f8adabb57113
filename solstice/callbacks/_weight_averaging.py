"""Weight averaging: an average of the experiment's weights kept inside the compiled step.

`WeightAveraging` (an equal-weight running mean), `EMAWeightAveraging` (an exponential
moving average) and `StochasticWeightAveraging` (the mean from an epoch on) carry the
average as an in-step state (`solstice.InStep`): it is updated on the device in every
training step (no host sync), saved in every checkpoint and restored exactly on resume.
Validation, test and predict runs use the averaged weights (`evaluation_experiment`), and
`fit` returns them, as Lightning's `WeightAveraging` does.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._experiment import Experiment
from .._in_step import InStep, StepData
from .._optimizer import Optimizer
from .._view import TrainerView
from ._callback import Callback


def _is_optimizer(x: Any) -> bool:
    return isinstance(x, Optimizer)


def averaged_mask(experiment: PyTree, where: Callable[[Any], PyTree] | None) -> PyTree:
    """Which leaves of `experiment` are averaged (a pytree of bools like it): its floating
    arrays outside its `solstice.Optimizer`s, and with `where` only those of
    `where(experiment)`."""
    chosen = None if where is None else {id(x) for x in jax.tree.leaves(where(experiment))}

    def leaf(x: Any) -> Any:
        if _is_optimizer(x):
            return jax.tree.map(lambda _: False, x)
        return eqx.is_inexact_array(x) and (chosen is None or id(x) in chosen)

    return jax.tree.map(leaf, experiment, is_leaf=_is_optimizer)


def _high_precision(x: jax.Array) -> jax.Array:
    """`x` in the precision an average keeps: at least float32 (a bfloat16 average would
    lose a small EMA step entirely)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@jax.jit
def _chosen(average: PyTree, count: jax.Array, weights: PyTree) -> PyTree:
    """The average in the weights' dtypes, or the weights while nothing was averaged yet."""
    return jax.tree.map(lambda a, w: jnp.where(count > 0, a.astype(w.dtype), w), average, weights)


class _Averaging(InStep):
    """The in-step state of a `WeightAveraging`: `{"average": the averaged leaves (None
    elsewhere), "count": how many updates it holds}`."""

    def __init__(self, callback: "WeightAveraging"):
        self.callback = callback

    def weights(self, experiment: PyTree) -> PyTree:
        return jax.tree.map(
            _high_precision, eqx.filter(experiment, averaged_mask(experiment, self.callback.where))
        )

    def init(self, experiment: Any) -> PyTree:
        weights = self.weights(experiment)
        if not jax.tree.leaves(weights):
            raise ValueError(
                f"{type(self.callback).__name__}: `{type(experiment).__name__}` has no floating "
                "array outside its optimizers"
                + ("" if self.callback.where is None else " within `where(experiment)`")
                + ", so there is nothing to average. Check `where=` selects the model."
            )
        return {"average": weights, "count": jnp.zeros((), jnp.int32)}

    def update(self, carry: PyTree, data: StepData) -> PyTree:
        cb, count = self.callback, carry["count"]
        new = cb.update_average(carry["average"], self.weights(data.experiment), count)
        should = cb.should_update(data.step - 1)
        if should is True:
            return {"average": new, "count": count + 1}
        should = jnp.asarray(should)
        average = jax.tree.map(lambda n, o: jnp.where(should, n, o), new, carry["average"])
        return {"average": average, "count": count + should.astype(jnp.int32)}

    def __repr__(self) -> str:
        return f"_Averaging({type(self.callback).__name__})"


class WeightAveraging(Callback):
    """Keeps an average of the experiment's weights, updated inside the compiled training
    step; validation, test and predict use it, and `fit` returns it.

    The average covers the experiment's floating arrays outside its `solstice.Optimizer`s
    (the model's parameters and any floating state such as batch-norm statistics; not the
    optimizer's state, nor integer counters or PRNG keys), or with `where` a part of them. It
    is kept in at least float32 (a bfloat16 model gets a float32 average) and cast back when
    swapped in. It lives on the devices as an in-step state (`solstice.InStep`): updated
    after every training step with no host sync, saved in every checkpoint beside the
    training weights, and restored exactly when `fit(ckpt_path=...)` resumes.

    - Evaluation: with `swap_for_evaluation`, validation (inside `fit` and after), test and
      predict runs evaluate the experiment with the average swapped in (Keras's
      `SwapEMAWeights`); training goes on from the training weights. After `fit`, this holds
      for the experiment `fit` returned and for `ckpt_path=` checkpoints (their average).
      Before the first update, they use the weights as they are.
    - The trained result: with `use_average_at_end`, `fit` returns the experiment with the
      average swapped in (as Lightning's `WeightAveraging` copies it into the module when
      training ends). `averaged_experiment(trainer)` gives it at any time.

    This base class takes the equal-weight mean of the weights after every step; subclasses
    override `should_update` (when) and `update_average` (how).

    **Arguments:**

    - `where`: which part of the experiment to average, as a function of the experiment
      (as in `eqx.tree_at`), e.g. `lambda e: e.model`. Default: all of it.
    - `swap_for_evaluation`: evaluate with the average (default `True`).
    - `use_average_at_end`: `fit` returns the averaged experiment (default `True`).

    **Example:**

    ```python
    ema = EMAWeightAveraging(decay=0.999)
    trainer = solstice.Trainer(max_epochs=10, callbacks=[ema])
    averaged = trainer.fit(experiment, datamodule)   # validation used the average too
    ```
    """

    def __init__(
        self,
        *,
        where: Callable[[Any], PyTree] | None = None,
        swap_for_evaluation: bool = True,
        use_average_at_end: bool = True,
    ):
        if where is not None and not callable(where):
            raise TypeError(
                f"`where` must be a function of the experiment returning the part to average "
                f"(e.g. `where=lambda e: e.model`), got {where!r}."
            )
        self.where = where
        self.swap_for_evaluation = bool(swap_for_evaluation)
        self.use_average_at_end = bool(use_average_at_end)
        self._averaging = _Averaging(self)

    def in_step(self) -> InStep:
        return self._averaging

    # ---- the rule (traced, inside the training step)
    def should_update(self, step_idx: jax.Array) -> jax.Array | bool:
        """Whether the step with zero-based index `step_idx` (an int32 scalar: the global
        step minus one, as in Lightning) updates the average. Traced; return `True` for
        every step. Default: every step."""
        return True

    def update_average(self, average: PyTree, weights: PyTree, count: jax.Array) -> PyTree:
        """The new average from the old one, the weights after the step (both in the
        average's precision) and the number of updates it holds (0: this is the first).
        Traced. Default: the equal-weight running mean, `average + (weights - average) /
        (count + 1)` (the weights themselves at the first update)."""
        n = (count + 1).astype(jnp.float32)
        return jax.tree.map(
            lambda a, w: jnp.where(count == 0, w, a + (w - a) / n.astype(a.dtype)),
            average,
            weights,
        )

    # ---- the averaged experiment
    def swap_in(self, experiment: Experiment, state: PyTree) -> Experiment:
        """`experiment` with the average of `state` (this callback's in-step state) in place
        of its averaged leaves, in their dtypes (its own leaves while the average holds no
        update yet)."""
        mask = averaged_mask(experiment, self.where)
        weights = eqx.filter(experiment, mask)
        average = state["average"]
        if jax.tree.structure(average) != jax.tree.structure(weights):  # type: ignore[operator]
            raise ValueError(
                f"{type(self).__name__}: the average does not fit `{type(experiment).__name__}` "
                "(it was taken of an experiment with other arrays). Swap it into the "
                "experiment it was computed for."
            )
        chosen = _chosen(average, state["count"], weights)
        return eqx.combine(chosen, eqx.filter(experiment, mask, inverse=True))

    def averaged_experiment(self, trainer: TrainerView) -> Experiment:
        """The trainer's current (or last) run's experiment with this callback's average
        swapped in: during `fit` the running average; after `fit`, the final one (the
        experiment `fit` returned when `use_average_at_end`); after `validate`/`test`/
        `predict` with `ckpt_path=`, that checkpoint's."""
        state = trainer.in_step_value(self)
        if state is None:
            raise ValueError(
                f"{type(self).__name__}: the trainer's current run has no average (it "
                "evaluated an experiment that is neither the one `fit` returned nor loaded "
                "with `ckpt_path=`). Call this during or after `fit`, or after `validate`/"
                "`test` with `ckpt_path=`."
            )
        return self.swap_in(trainer.experiment, state)

    # ---- hooks
    def evaluation_experiment(self, trainer: TrainerView, experiment: Experiment) -> Any:
        if not self.swap_for_evaluation:
            return None
        state = trainer.in_step_value(self)
        return None if state is None else self.swap_in(experiment, state)

    def on_train_end(self, trainer: TrainerView, experiment: Experiment) -> None:
        if self.use_average_at_end:
            state = trainer.in_step_value(self)
            trainer.replace_experiment(self.swap_in(experiment, state), by=type(self).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


class EMAWeightAveraging(WeightAveraging):
    """An exponential moving average (EMA) of the weights (Lightning's
    `EMAWeightAveraging`; see `WeightAveraging` for what is averaged, evaluation and the
    trained result).

    At the first update the average is the weights themselves; then, at every update,
    `average = decay * average + (1 - decay) * weights` (weights after the step). As in
    Lightning (torch's `AveragedModel`) it starts from the weights after the first update,
    not from the initial weights as Keras's `use_ema` does, so it carries no bias toward the
    initialisation and needs no debiasing (optax's `ema(debias=True)`).

    **Arguments:**

    - `decay`: in [0, 1]; the weight of the past (default 0.999).
    - `update_every_n_steps`: update after steps whose zero-based index is a multiple of it.
    - `update_starting_at_step`: the first zero-based step index that updates (default 0).
    - `where`, `swap_for_evaluation`, `use_average_at_end`: as in `WeightAveraging`.

    **Example:**

    ```python
    trainer = solstice.Trainer(max_epochs=10, callbacks=[EMAWeightAveraging(decay=0.999)])
    ```
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        where: Callable[[Any], PyTree] | None = None,
        swap_for_evaluation: bool = True,
        use_average_at_end: bool = True,
    ):
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay <= 1:
            raise ValueError(f"`decay` must be a number in [0, 1] (e.g. 0.999), got {decay!r}.")
        super().__init__(
            where=where,
            swap_for_evaluation=swap_for_evaluation,
            use_average_at_end=use_average_at_end,
        )
        self.decay = float(decay)
        self.update_every_n_steps = _check_int("update_every_n_steps", update_every_n_steps, 1)
        self.update_starting_at_step = (
            None
            if update_starting_at_step is None
            else _check_int("update_starting_at_step", update_starting_at_step, 0)
        )

    def should_update(self, step_idx: jax.Array) -> jax.Array | bool:
        start, every = self.update_starting_at_step, self.update_every_n_steps
        if not start and every == 1:
            return True
        due = step_idx % every == 0
        return due if start is None else due & (step_idx >= start)

    def update_average(self, average: PyTree, weights: PyTree, count: jax.Array) -> PyTree:
        d = self.decay
        return jax.tree.map(
            lambda a, w: jnp.where(count == 0, w, a * d + w * (1 - d)), average, weights
        )

    def __repr__(self) -> str:
        return f"EMAWeightAveraging(decay={self.decay})"


class StochasticWeightAveraging(WeightAveraging):
    """Stochastic Weight Averaging (SWA, Izmailov et al. 2018): the equal-weight mean of the
    weights after every training step from epoch `swa_epoch_start` on (Lightning's
    `StochasticWeightAveraging`; see `WeightAveraging` for what is averaged, evaluation and
    the trained result).

    Before that epoch the average holds nothing, and evaluation uses the training weights.
    The first averaged step is the first of that epoch: its global step is
    `swa_epoch_start * num_training_batches`, fixed when training starts and baked into the
    compiled step. Unlike Lightning's callback, it averages after every step rather than once
    per epoch, and leaves the learning rate to the optimizer: Lightning's `swa_lrs`,
    `annealing_epochs` and `annealing_strategy` are not supported (give the optimizer an
    optax schedule that turns constant or cyclic from the start epoch), nor is its `avg_fn`
    (subclass `WeightAveraging`). Batch-norm statistics are averaged like the parameters
    (there is no pass that recomputes them for the averaged weights; `where=` can leave
    them out).

    **Arguments:**

    - `swa_epoch_start`: the zero-based epoch from which to average (an int), or a fraction
      in (0, 1] of `max_epochs` (`int(swa_epoch_start * max_epochs)`, as in Lightning).
    - `where`, `swap_for_evaluation`, `use_average_at_end`: as in `WeightAveraging`.

    **Example:**

    ```python
    trainer = solstice.Trainer(max_epochs=20, callbacks=[StochasticWeightAveraging(0.75)])
    ```
    """

    def __init__(
        self,
        swa_epoch_start: int | float = 0.8,
        *,
        where: Callable[[Any], PyTree] | None = None,
        swap_for_evaluation: bool = True,
        use_average_at_end: bool = True,
    ):
        fraction = isinstance(swa_epoch_start, float) and 0 < swa_epoch_start <= 1
        epoch = isinstance(swa_epoch_start, int) and not isinstance(swa_epoch_start, bool)
        if not (fraction or (epoch and swa_epoch_start >= 0)):
            raise ValueError(
                "`swa_epoch_start` must be an int epoch >= 0 or a float fraction of "
                f"`max_epochs` in (0, 1], got {swa_epoch_start!r}."
            )
        super().__init__(
            where=where,
            swap_for_evaluation=swap_for_evaluation,
            use_average_at_end=use_average_at_end,
        )
        self.swa_epoch_start = swa_epoch_start
        #: The zero-based index of the first averaged step, once training has started.
        self.swa_start_step: int | None = None

    def start_epoch(self, max_epochs: int | None) -> int:
        """The zero-based epoch averaging starts at."""
        if isinstance(self.swa_epoch_start, int):
            return self.swa_epoch_start
        if max_epochs is None:
            raise ValueError(
                f"`StochasticWeightAveraging(swa_epoch_start={self.swa_epoch_start})` is a "
                "fraction of `max_epochs`, but the Trainer has none. Set `max_epochs`, or "
                "pass the start epoch as an int."
            )
        return int(self.swa_epoch_start * max_epochs)

    def on_fit_start(self, trainer: TrainerView, experiment: Experiment) -> None:
        start = self.start_epoch(trainer.max_epochs)
        if trainer.max_epochs is not None and start >= trainer.max_epochs:
            raise ValueError(
                f"`StochasticWeightAveraging` would start at epoch {start}, but "
                f"`max_epochs={trainer.max_epochs}` ends training before it (epochs count "
                "from 0). Lower `swa_epoch_start` or raise `max_epochs`."
            )
        self.swa_start_step = None

    def on_train_epoch_start(self, trainer: TrainerView, experiment: Experiment) -> None:
        if self.swa_start_step is None:  # before the first training step is compiled
            batches = trainer.num_training_batches
            if batches is None:
                raise ValueError(
                    "`StochasticWeightAveraging` needs the number of training batches per "
                    "epoch to find the step its start epoch begins at; the training loader's "
                    "length is unknown. Give it a length, or set `limit_train_batches`."
                )
            self.swa_start_step = self.start_epoch(trainer.max_epochs) * batches

    def should_update(self, step_idx: jax.Array) -> jax.Array | bool:
        if self.swa_start_step is None:
            raise RuntimeError(
                "StochasticWeightAveraging: the training step was compiled before the "
                "callback saw the first training epoch start, so the step to start "
                "averaging at is unknown."
            )
        return True if self.swa_start_step == 0 else step_idx >= self.swa_start_step

    def __repr__(self) -> str:
        return f"StochasticWeightAveraging(swa_epoch_start={self.swa_epoch_start})"
