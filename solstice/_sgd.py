"""`SGDOptimizer`: stochastic gradient descent with momentum, Nesterov and weight decay."""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree

from ._optimizer import Optimizer

Schedule = Callable[[Array], Any]

_INT32_MAX = jnp.iinfo(jnp.int32).max


def _is_none(x: Any) -> bool:
    return x is None


def _check_hyperparameter(name: str, value: Any, fix: str) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(
            f"`{name}` must be a number, but got {value!r} of type {type(value).__name__}."
        )
    if not isinstance(value, (int, float)):
        try:
            value = float(value)  # NumPy or concrete JAX scalars
        except (TypeError, ValueError):
            raise TypeError(
                f"`{name}` must be a number, but got {value!r} of type {type(value).__name__}."
            ) from None
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, but got {value}. {fix}")
    return value


class SGDOptimizer(Optimizer):
    """Stochastic gradient descent, with optional momentum, Nesterov momentum and weight decay.

    Each call computes, leaf by leaf (as PyTorch's `torch.optim.SGD` does):

    ```
    g     = grads + weight_decay * params
    trace = g + momentum * trace                       (trace starts at zero)
    step  = g + momentum * trace  if nesterov  else  trace
    updates = -learning_rate(count) * step;  count += 1
    ```

    This is exactly `optax.chain(optax.add_decayed_weights(weight_decay),
    optax.sgd(learning_rate, momentum, nesterov))`, written out (no optax inside). The
    momentum trace is kept for the floating-point arrays of `params` only.

    **Arguments:**

    - `params`: the parameters, e.g. an Equinox model; only its arrays are used (it is
        filtered with `eqx.filter(params, eqx.is_array)`).
    - `learning_rate`: a float, or a schedule: a function from the step count (an int32
        array, 0 for the first update) to the learning rate, e.g. any optax schedule.
    - `momentum`: the decay of the momentum trace; `0.0` (the default) for plain SGD.
    - `nesterov`: use Nesterov momentum (needs `momentum > 0`).
    - `weight_decay`: L2 penalty coefficient added to the gradients; needs `params` in
        `__call__`.

    **Example:**

    ```python
    schedule = optax.cosine_decay_schedule(0.1, decay_steps=1000)
    optimizer = solstice.SGDOptimizer(model, schedule, momentum=0.9, weight_decay=5e-4)
    grads = eqx.filter_grad(loss_fn)(model, x, y)
    updates, optimizer = optimizer(grads, eqx.filter(model, eqx.is_array))
    model = eqx.apply_updates(model, updates)
    optimizer.current_learning_rate()  # the learning rate of that update
    ```
    """

    trace: PyTree
    count: Int[Array, ""]  # noqa: F722
    learning_rate: float | Schedule = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    nesterov: bool = eqx.field(static=True)
    weight_decay: float = eqx.field(static=True)

    def __init__(
        self,
        params: PyTree,
        learning_rate: float | Schedule,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        if not callable(learning_rate):
            learning_rate = _check_hyperparameter(
                "learning_rate",
                learning_rate,
                "Pass a positive step size such as `learning_rate=0.01`, or a schedule.",
            )
        momentum = _check_hyperparameter(
            "momentum", momentum, "Use `momentum=0.0` for plain SGD, or e.g. `momentum=0.9`."
        )
        weight_decay = _check_hyperparameter(
            "weight_decay", weight_decay, "Use `weight_decay=0.0` for none, or e.g. `5e-4`."
        )
        if nesterov and momentum == 0:
            raise ValueError(
                "`nesterov=True` needs momentum, but `momentum=0.0`. Pass a momentum, e.g. "
                "`momentum=0.9, nesterov=True`, or drop `nesterov=True`."
            )
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.nesterov = bool(nesterov)
        self.weight_decay = weight_decay
        self.count = jnp.zeros((), jnp.int32)
        if momentum == 0:
            self.trace = None
        else:
            params = eqx.filter(params, eqx.is_inexact_array)
            self.trace = jax.tree.map(jnp.zeros_like, params)

    def __call__(
        self, grads: PyTree, params: PyTree | None = None
    ) -> tuple[PyTree, "SGDOptimizer"]:
        """Turn `grads` into `updates`, and return them with the optimizer after this step.

        **Arguments:**

        - `grads`: the gradients, with the structure of the parameters (`None` leaves, as
            `eqx.filter_grad` gives for non-differentiable parts, are passed through).
        - `params`: the current parameters; needed only when `weight_decay > 0`.

        **Returns:**

        `(updates, optimizer)`: add `updates` with `eqx.apply_updates(model, updates)`.
        """
        updates = grads
        if self.weight_decay > 0:
            if params is None:
                raise ValueError(
                    f"`SGDOptimizer(weight_decay={self.weight_decay})` needs the current "
                    "parameters, but `params` is None. Call "
                    "`optimizer(grads, eqx.filter(model, eqx.is_array))`."
                )
            params = eqx.filter(params, eqx.is_array)
            updates = jax.tree.map(
                lambda g, p: None if g is None else g + self.weight_decay * p,
                updates,
                params,
                is_leaf=_is_none,
            )

        trace = self.trace
        if self.momentum > 0:

            def accumulate(g, t):
                if g is None:
                    return t
                if t is None:
                    raise ValueError(
                        "`grads` has a gradient where the `params` given to `SGDOptimizer` had "
                        "no floating-point array. Build the optimizer from the same model "
                        "that you differentiate."
                    )
                return g + self.momentum * t

            trace = jax.tree.map(accumulate, updates, self.trace, is_leaf=_is_none)
            if self.nesterov:
                updates = jax.tree.map(
                    lambda g, t: None if g is None else g + self.momentum * t,
                    updates,
                    trace,
                    is_leaf=_is_none,
                )
            else:
                updates = jax.tree.map(
                    lambda g, t: None if g is None else t, updates, trace, is_leaf=_is_none
                )

        if callable(self.learning_rate):
            rate = -jnp.asarray(self.learning_rate(self.count))
            updates = jax.tree.map(lambda u: jnp.asarray(rate, u.dtype) * u, updates)
        else:
            step_size = -self.learning_rate  # a Python float: takes each leaf's dtype
            updates = jax.tree.map(lambda u: step_size * u, updates)
        count = jnp.where(self.count < _INT32_MAX, self.count + 1, self.count)
        return updates, eqx.tree_at(
            lambda o: (o.trace, o.count), self, (trace, count), is_leaf=_is_none
        )

    def _learning_rate_at(self, count: Array) -> Array:
        if callable(self.learning_rate):
            return jnp.asarray(self.learning_rate(count))
        return jnp.asarray(self.learning_rate, jnp.float32)

    def current_learning_rate(self) -> Array:
        """The learning rate of the most recent update (before any update: of the first one).

        This is what `optax.inject_hyperparams` records, so a learning-rate monitor reads the
        same value from `SGDOptimizer` and from `OptaxOptimizer`.

        **Returns:**

        A scalar array.
        """
        return self._learning_rate_at(jnp.maximum(self.count - 1, 0))
