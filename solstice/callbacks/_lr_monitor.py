"""`LearningRateMonitor`: logs the learning rate of every optimizer in the experiment."""

from collections.abc import Callable
from typing import Any

import jax

from .._optimizer import Optimizer
from ._callback import Callback


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

    The value comes from each optimizer's `current_learning_rate()`: the
    `optax.inject_hyperparams` state of an `OptaxOptimizer`, or the schedule of an
    `SGDOptimizer`. For a plain optax schedule that is not injected, pass it as `schedule=`
    and it is evaluated at the global step. With several optimizers the names are
    `lr/<path>` (e.g. `lr/generator_opt`). The value is logged as a device scalar: it is
    converted on the logging thread, never on the training thread.

    **Arguments:**

    - `logging_interval`: `"step"` (every `log_every_n_steps`) or `"epoch"`.
    - `schedule`: optional `step -> learning rate` function, used when the optimizer does
      not expose its learning rate.

    **Example:**

    ```python
    opt = solstice.OptaxOptimizer(optax.inject_hyperparams(optax.adam)(learning_rate=sched), model)
    trainer = solstice.Trainer(max_epochs=3, callbacks=[LearningRateMonitor()])
    ```
    """

    def __init__(
        self, logging_interval: str = "step", schedule: Callable[[int], Any] | None = None
    ):
        if logging_interval not in ("step", "epoch"):
            raise ValueError(
                f"`logging_interval` must be 'step' or 'epoch', got {logging_interval!r}."
            )
        self.logging_interval = logging_interval
        self.schedule = schedule

    def learning_rates(self, trainer, experiment) -> dict[str, Any]:
        """The current learning rate(s) as `{name: value}`."""
        if self.schedule is not None:
            return {"lr": self.schedule(trainer.global_step)}
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
        interval = any(k.startswith("train/") and not k.endswith("_epoch") for k in metrics)
        epoch_end = any(k.startswith("train/") and k.endswith("_epoch") for k in metrics)
        if (self.logging_interval == "step" and interval) or (
            self.logging_interval == "epoch" and epoch_end
        ):
            trainer.log_metrics(self.learning_rates(trainer, experiment), step)
