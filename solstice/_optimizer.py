"""The `Optimizer` abstraction: optimizer state plus the rule that turns gradients into updates."""

import abc
from typing import Any

import equinox as eqx
from jaxtyping import PyTree


class Optimizer(eqx.Module):
    """Holds optimizer state; `__call__` turns gradients into updates and a new optimizer.

    Subclasses build their state in `__init__` (the optax `init`) and implement `__call__`
    (the optax `update`). Optimizers are immutable: `__call__` returns the updates *and* the
    optimizer carrying the new state.

    **Example:**

    ```python
    grads = eqx.filter_grad(loss_fn)(model, batch)
    updates, optimizer = optimizer(grads, eqx.filter(model, eqx.is_array))
    model = eqx.apply_updates(model, updates)
    ```
    """

    @abc.abstractmethod
    def __call__(self, grads: PyTree, params: PyTree | None = None) -> tuple[PyTree, "Optimizer"]:
        """Return `(updates, new_optimizer)`; `params` is the current parameter tree."""

    def current_learning_rate(self) -> Any:
        """The learning rate of the latest update (a scalar array), or `None` if unknown.

        Read by `solstice.callbacks.LearningRateMonitor`; override it in optimizers that
        have a learning rate.
        """
        return None

    def with_learning_rate(self, learning_rate: Any) -> "Optimizer":
        """This optimizer with its next update made at `learning_rate` (a scalar array; may
        be traced), everything else unchanged. Used by `solstice.tuner.lr_find` to sweep the
        rate inside the compiled step.

        Optimizers whose learning rate is part of their state override it; the default
        raises `TypeError`.
        """
        raise TypeError(
            f"`{type(self).__name__}` cannot set its learning rate per step: it keeps the rate "
            "outside its state. Use `solstice.OptaxOptimizer(optax.inject_hyperparams("
            "optax.adam)(learning_rate=1e-3), model)` (any optax optimizer, wrapped with "
            "`optax.inject_hyperparams`, with a constant rate), or override "
            "`with_learning_rate` in your `Optimizer`."
        )
