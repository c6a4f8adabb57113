"""The optimizer tap: the Trainer's view of what a `train_step` hands its optimizers.

A `train_step` is the user's code: the Trainer sees neither the gradients it computes nor the
updates it applies. But every `solstice.Optimizer` in the experiment is called with them. Inside
the compiled training step the Trainer can therefore wrap each `Optimizer` of the experiment in
a `Tap` (`tap`), let `train_step` run, and unwrap the result (`untap`): each tap has recorded
the gradients, parameters and updates of its call (`OptimizerCall`), and a `TapRule` may change
what the call does (sum gradients over microbatches and apply them once, rescale the updates,
cast the gradients). All of it happens while tracing: a tapped step costs what the rule and the
records' uses add, nothing else.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
from jaxtyping import PyTree

from ._optimizer import Optimizer


class OptimizerCall(NamedTuple):
    """What one optimizer call of a training step saw (traced values).

    - `grads`: the gradients `train_step` passed (after the rule, if it changed them).
    - `params`: the parameters passed (their arrays), or `None` if none were.
    - `updates`: the updates the call returned to `train_step`.
    """

    grads: PyTree
    params: PyTree
    updates: PyTree


#: `rule(inner, grads, params, extra_args, carry) -> (updates, new_inner, new_carry,
#: grads_seen)`: what a tapped call does instead of `inner(grads, params, **extra_args)`.
#: `carry` is the rule's own state for this optimizer (a pytree of arrays, or None), kept
#: between steps by whoever taps; `grads_seen` is what `OptimizerCall.grads` records.
TapRule = Callable[
    [Optimizer, PyTree, PyTree, dict[str, Any], PyTree],
    tuple[PyTree, Optimizer, PyTree, PyTree],
]


def _is_optimizer(x: Any) -> bool:
    return isinstance(x, Optimizer)


class Tap(Optimizer):
    """An `Optimizer` wrapped by the Trainer for one training step: it calls the wrapped
    one (or its `rule`), and the optimizer it returns records the call."""

    inner: Optimizer
    carry: PyTree
    call: OptimizerCall | None
    rule: TapRule | None = eqx.field(static=True)

    def __call__(
        self, grads: PyTree, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, "Tap"]:
        arrays = None if params is None else eqx.filter(params, eqx.is_array)
        if self.rule is None:
            updates, inner = self.inner(grads, params, **extra_args)
            carry, seen = self.carry, grads
        else:
            updates, inner, carry, seen = self.rule(
                self.inner, grads, params, extra_args, self.carry
            )
        return updates, Tap(inner, carry, OptimizerCall(seen, arrays, updates), self.rule)

    def current_learning_rate(self) -> Any:
        return self.inner.current_learning_rate()

    def with_learning_rate(self, learning_rate: Any) -> "Tap":
        return Tap(self.inner.with_learning_rate(learning_rate), self.carry, self.call, self.rule)

    def __getattr__(self, name: str) -> Any:
        # `train_step` may read its optimizer's own fields (`self.optimizer.opt_state`).
        if name in ("inner", "carry", "call", "rule") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def optimizers_of(experiment: PyTree) -> list[Optimizer]:
    """The `Optimizer`s of `experiment`, outermost only, in tree order."""
    return [x for x in jax.tree.leaves(experiment, is_leaf=_is_optimizer) if _is_optimizer(x)]


def tap(experiment: PyTree, rule: TapRule | None = None, carries: list | None = None) -> PyTree:
    """`experiment` with each of its `Optimizer`s wrapped in a `Tap` (with `rule` and, in tree
    order, `carries`: each optimizer's rule state; `None`: none)."""
    count = len(optimizers_of(experiment))
    if carries is None:
        carries = [None] * count
    if len(carries) != count:
        raise ValueError(f"{len(carries)} tap carries for {count} optimizers.")
    remaining = iter(carries)

    def wrap(x: Any) -> Any:
        return Tap(x, next(remaining), None, rule) if _is_optimizer(x) else x

    return jax.tree.map(wrap, experiment, is_leaf=_is_optimizer)


def untap(
    experiment: PyTree, expected: int, method: str = "train_step"
) -> tuple[PyTree, list[Tap]]:
    """`experiment` with every `Tap` replaced by the optimizer it wraps, and the taps in tree
    order. Raises `ValueError` when there are not `expected` of them (the step dropped an
    optimizer, or built a new one, instead of keeping the one its call returned)."""
    taps: list[Tap] = []

    def unwrap(x: Any) -> Any:
        if isinstance(x, Tap):
            taps.append(x)
            return x.inner
        return x

    unwrapped = jax.tree.map(unwrap, experiment, is_leaf=_is_optimizer)
    name = type(experiment).__name__
    if len(taps) != expected:
        raise ValueError(
            f"`{name}.{method}` was given an experiment with {expected} `solstice.Optimizer`"
            f"(s) and returned one holding {len(taps)} of them as it received them. Keep the "
            "optimizer each call returns (`updates, optimizer = self.optimizer(grads, "
            "params)`, then put `optimizer` in the new experiment), rather than building a "
            "new one inside the step."
        )
    return unwrapped, taps


def calls_of(taps: list[Tap], method: str = "train_step") -> tuple[OptimizerCall, ...]:
    """The recorded call of each tap; raises `ValueError` naming the first optimizer that was
    not called."""
    calls = []
    for i, t in enumerate(taps):
        if t.call is None:
            raise ValueError(
                f"Optimizer {i} (`{type(t.inner).__name__}`) of the experiment was not called "
                f"in `{method}`, so there are no gradients to report. Call it every step "
                "(`updates, optimizer = self.optimizer(grads, params)`)."
            )
        calls.append(t.call)
    return tuple(calls)
