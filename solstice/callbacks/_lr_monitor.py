"""`LearningRateMonitor`: logs the learning rate of every optimizer in the experiment."""

from collections.abc import Callable
from typing import Any

import jax

from .._optimizer import Optimizer
from ._callback import Callback
from ._intervals import is_train_epoch_end, is_train_interval


def find_optimizers(tree: Any) -> dict[str, Optimizer]:
    """Every `solstice.Optimizer` inside `tree`, by pytree path (`"optimizer"`, ...)."""
    found = {}
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, Optimizer))
    for path, leaf in leaves:
        if isinstance(leaf, Optimizer):
            found[jax.tree_util.keystr(path, simple=True, separator=".")] = leaf
    return found


class LearningRateMonitor(Callback):
    """Logs `lr` at every log interval (or once per epoch).

    **The learning rate at step s** is the rate applied by the update of step s, counting
    steps from 1 as `trainer.global_step` does: the value logged at global step s (after s
    steps) is the rate the s-th update used, `schedule(s - 1)` in optax's 0-based update
    count. For `optax.linear_schedule(1.0, 0.0, transition_steps=100)`, step 1 logs 1.0 and
    step 5 logs 0.96. Every source below gives that same value, in both logging intervals:

    - an `OptaxOptimizer` wrapping `optax.inject_hyperparams(...)(learning_rate=schedule)`:
      its state records the rate of the update it last applied (`current_learning_rate()`);
    - an `SGDOptimizer` with a schedule: `current_learning_rate()`, defined the same way;
    - `schedule=`, for an optax schedule that is not injected: evaluated at
      `max(trainer.global_step - 1, 0)`, one update per training step (with
      `optax.MultiSteps`, inject the schedule instead, so the optimizer's own count is used).

    `logging_interval="epoch"` logs once per epoch at the epoch's last step: the rate of the
    epoch's last update. With several optimizers the names are `lr/<path>` (e.g.
    `lr/generator_opt`). The value is logged as a device scalar: it is converted on the
    logging thread, never on the training thread.

    **Arguments:**

    - `logging_interval`: `"step"` (every `log_every_n_steps`) or `"epoch"`.
    - `schedule`: optional function from optax's 0-based update count to the learning
      rate (any optax schedule), used instead of the optimizers' own record.

    **Example:**

    ```python
    sched = optax.linear_schedule(1.0, 0.0, transition_steps=100)
    opt = solstice.OptaxOptimizer(optax.inject_hyperparams(optax.sgd)(learning_rate=sched), model)
    trainer = solstice.Trainer(max_epochs=3, callbacks=[LearningRateMonitor()])
    # or, with `optax.sgd(sched)` not injected: LearningRateMonitor(schedule=sched)
    ```
    """

    def __init__(
        self, logging_interval: str = "step", schedule: Callable[[int], Any] | None = None
    ):
        if logging_interval not in ("step", "epoch"):
            raise ValueError(
                f"`LearningRateMonitor(logging_interval={logging_interval!r})`: "
                "`logging_interval` must be 'step' (every `log_every_n_steps`) or 'epoch'."
            )
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"`LearningRateMonitor(schedule=...)` must be a function from the update "
                f"count to the learning rate (e.g. an optax schedule), got {schedule!r}."
            )
        self.logging_interval = logging_interval
        self.schedule = schedule

    def learning_rates(self, trainer, experiment) -> dict[str, Any]:
        """The learning rate(s) of the latest step's update, as `{name: value}`."""
        if self.schedule is not None:
            # global step s: s updates done, the latest had 0-based count s - 1
            return {"lr": self.schedule(max(trainer.global_step - 1, 0))}
        rates = {}
        optimizers = find_optimizers(experiment)
        for path, opt in optimizers.items():
            get = getattr(opt, "current_learning_rate", None)
            value = get() if get is not None else None
            if value is not None:
                rates["lr" if len(optimizers) == 1 else f"lr/{path}"] = value
        return rates

    def on_fit_start(self, trainer, experiment) -> None:
        if self.schedule is None and not self.learning_rates(trainer, experiment):
            raise ValueError(
                f"`LearningRateMonitor` found no learning rate in `{type(experiment).__name__}`: "
                "its optimizers do not expose one. Wrap the optax optimizer with "
                "`optax.inject_hyperparams(optax.adam)(learning_rate=...)`, or pass the "
                "schedule: `LearningRateMonitor(schedule=my_schedule)`."
            )

    def on_log(self, trainer, experiment, metrics: dict[str, Any], step: int) -> None:
        if trainer.progress.stage != "train":
            return
        interval = is_train_interval(metrics)
        epoch_end = is_train_epoch_end(metrics)
        if (self.logging_interval == "step" and interval) or (
            self.logging_interval == "epoch" and epoch_end
        ):
            trainer.log_metrics(self.learning_rates(trainer, experiment), step)
