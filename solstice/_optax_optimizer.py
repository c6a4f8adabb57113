"""`OptaxOptimizer`: any `optax.GradientTransformation` as a Solstice `Optimizer`."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PyTree

from ._optimizer import Optimizer


def _has_hyperparams(x: Any) -> bool:
    """Whether `x` is an `optax.inject_hyperparams` state (or looks like one)."""
    return isinstance(getattr(x, "hyperparams", None), dict)


class OptaxOptimizer(Optimizer):
    """Wraps any `optax.GradientTransformation` as a Solstice `Optimizer`.

    `__init__` calls the transformation's `init` on the arrays of `params`, and `__call__`
    its `update`, passing `params` through, so transformations that need the parameters
    (`optax.adamw`, `optax.lookahead`, `optax.contrib` optimizers, ...) work. Gradient
    clipping, accumulation (`optax.MultiSteps(...).gradient_transformation()`) and schedules
    are optax transformations too: compose them with `optax.chain` and wrap the result.

    **Arguments:**

    - `transformation`: the `optax.GradientTransformation`, e.g. `optax.adam(1e-3)`.
    - `params`: the parameters, e.g. an Equinox model; only its arrays are used (it is
        filtered with `eqx.filter(params, eqx.is_array)`).

    **Example:**

    ```python
    schedule = optax.cosine_decay_schedule(1e-3, decay_steps=1000)
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)  # lr readable
    optimizer = solstice.OptaxOptimizer(adamw, model)
    grads = eqx.filter_grad(loss_fn)(model, x, y)
    updates, optimizer = optimizer(grads, model)
    model = eqx.apply_updates(model, updates)
    optimizer.current_learning_rate()  # the learning rate of that update
    ```
    """

    transformation: optax.GradientTransformation = eqx.field(static=True)
    opt_state: optax.OptState

    def __init__(self, transformation: optax.GradientTransformation, params: PyTree):
        if not isinstance(transformation, optax.GradientTransformation):
            if isinstance(transformation, optax.MultiSteps):
                fix = "Pass `multi_steps.gradient_transformation()`."
            elif callable(transformation):
                fix = (
                    "If it is an optimizer factory such as `optax.adam`, call it: "
                    "`optax.adam(learning_rate=1e-3)`."
                )
            else:
                fix = "Pass e.g. `optax.adam(1e-3)`."
            raise TypeError(
                "`OptaxOptimizer` expects an `optax.GradientTransformation`, but got "
                f"{transformation!r} of type {type(transformation).__name__}. {fix}"
            )
        self.transformation = transformation
        self.opt_state = transformation.init(eqx.filter(params, eqx.is_array))

    def __call__(
        self, grads: PyTree, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, "OptaxOptimizer"]:
        """Turn `grads` into `updates` with the transformation's `update`.

        **Arguments:**

        - `grads`: the gradients, with the structure of the parameters.
        - `params`: the current parameters (a model or its arrays), for transformations
            that need them; otherwise optional.
        - `**extra_args`: passed to `update` for transformations that take extra
            arguments (`optax.GradientTransformationExtraArgs`), e.g. `value=loss` for
            `optax.contrib.reduce_on_plateau`.

        **Returns:**

        `(updates, optimizer)`: add `updates` with `eqx.apply_updates(model, updates)`.
        """
        if params is not None:
            params = eqx.filter(params, eqx.is_array)
        transformation = self.transformation
        if extra_args:
            transformation = optax.with_extra_args_support(transformation)
        updates, opt_state = transformation.update(grads, self.opt_state, params, **extra_args)
        return updates, eqx.tree_at(lambda o: o.opt_state, self, opt_state)

    def with_learning_rate(self, learning_rate: Any) -> "OptaxOptimizer":
        """This optimizer with its next update made at `learning_rate`: the rate recorded by
        every `optax.inject_hyperparams` state in `opt_state` is replaced (in its dtype), and
        that rate is the one the next `update` uses. Exact for any optimizer, whatever its
        state (Adam's moments, a lookahead...).

        **Raises:**

        `TypeError` if no `optax.inject_hyperparams` state with a `learning_rate` is found,
        or if the rate is injected as a schedule (the schedule would overwrite it at every
        update): build the optimizer as
        `optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)`, with a number.
        """
        found = []

        def replace(state: Any) -> Any:
            if not (_has_hyperparams(state) and "learning_rate" in state.hyperparams):
                return state
            if "learning_rate" in (getattr(state, "hyperparams_states", None) or {}):
                raise TypeError(
                    "`OptaxOptimizer.with_learning_rate`: the learning rate is injected as a "
                    "schedule, which sets it again at every update. Inject a number instead: "
                    "`optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)`."
                )
            old = state.hyperparams["learning_rate"]
            found.append(old)
            rate = jnp.asarray(learning_rate, dtype=jnp.result_type(old))
            return state._replace(hyperparams={**state.hyperparams, "learning_rate": rate})

        opt_state = jax.tree.map(replace, self.opt_state, is_leaf=_has_hyperparams)
        if not found:
            raise TypeError(
                "`OptaxOptimizer.with_learning_rate`: the optimizer's state holds no learning "
                "rate to set. Wrap the optax optimizer with `optax.inject_hyperparams`: "
                "`optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)`."
            )
        return eqx.tree_at(lambda o: o.opt_state, self, opt_state)

    def current_learning_rate(self) -> Array | None:
        """The learning rate recorded by `optax.inject_hyperparams`, if any.

        Searches `opt_state` (through `optax.chain`, wrappers and so on) for the state of an
        `optax.inject_hyperparams` transformation with a `learning_rate` and returns the
        first one found: the learning rate of the most recent update (before any update: of
        the first one).

        **Returns:**

        A scalar array, or `None` if the transformation does not inject a learning rate.
        Wrap the optimizer as `optax.inject_hyperparams(optax.adam)(learning_rate=...)` to
        make it visible.
        """
        for state in jax.tree.leaves(self.opt_state, is_leaf=_has_hyperparams):
            if _has_hyperparams(state) and "learning_rate" in state.hyperparams:
                return state.hyperparams["learning_rate"]
        return None
