"""Loss scaling for float16 training: `scale_loss`, and the dynamic scale the Trainer keeps.

Float16 has a narrow range: small gradients underflow to zero. Multiplying the loss by a large
factor before differentiating scales every gradient by it; the optimizer then sees the
gradients divided by it again. Only `train_step` knows its loss, so it marks it with
`solstice.scale_loss(loss)`; the Trainer (under `precision="16-mixed"`) decides the factor,
unscales the gradients in the optimizer call, skips steps whose gradients overflowed and
adapts the factor (`LossScale`): halved after an overflow, doubled after a run of finite steps.
"""

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike


@dataclasses.dataclass
class _Scaling:
    """While a training step is traced under loss scaling: the factor, and whether the step
    used it."""

    scale: jax.Array
    used: bool = False


_ACTIVE: contextvars.ContextVar[_Scaling | None] = contextvars.ContextVar(
    "solstice_loss_scaling", default=None
)


def scale_loss(loss: ArrayLike) -> Array:
    """The loss to differentiate: `loss` times the current loss scale under
    `Trainer(precision="16-mixed")`, else `loss` itself.

    Call it on the value your `train_step`'s loss function returns to `jax.grad` (not on
    the loss you report in metrics). The Trainer divides the gradients by the same factor
    before the optimizer sees them, so every other precision, and a `train_step` called
    outside a Trainer, see no difference.

    **Arguments:**

    - `loss`: the scalar loss.

    **Returns:**

    `loss * scale` (in float32, or `loss`'s dtype if wider) while the Trainer traces a
    `16-mixed` training step, else `loss`.

    **Example:**

    ```python
    def loss_fn(model):
        loss = jnp.mean((jax.vmap(model)(x) - y) ** 2)
        return solstice.scale_loss(loss)

    grads = eqx.filter_grad(loss_fn)(self.model)
    ```
    """
    scaling = _ACTIVE.get()
    loss = jnp.asarray(loss)
    if scaling is None:
        return loss
    scaling.used = True
    # In float32 at least: a float16 loss times the scale would overflow by itself.
    return loss.astype(jnp.promote_types(loss.dtype, jnp.float32)) * scaling.scale


@contextlib.contextmanager
def loss_scaling(scale: jax.Array) -> Iterator[_Scaling]:
    """While tracing a training step: `scale_loss` multiplies by `scale`; the record yielded
    says whether it was called."""
    scaling = _Scaling(scale)
    token = _ACTIVE.set(scaling)
    try:
        yield scaling
    finally:
        _ACTIVE.reset(token)


class LossScale(NamedTuple):
    """The dynamic loss scale between steps (torch's `GradScaler`, jmp's `DynamicLossScale`):
    `scale` (float32) and `good_steps`, the finite steps since it last changed (int32)."""

    scale: jax.Array
    good_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class DynamicScaling:
    """How the loss scale adapts: it starts at `initial`, is multiplied by `backoff` (never
    below 1) after a step whose gradients were not finite, and by `growth` after
    `growth_interval` finite steps in a row (torch's `GradScaler` defaults, but for `initial`
    2**15, jmp's, which float16 loss values tolerate better)."""

    initial: float = 2.0**15
    growth_interval: int = 2000
    growth: float = 2.0
    backoff: float = 0.5

    def init(self) -> LossScale:
        return LossScale(jnp.asarray(self.initial, jnp.float32), jnp.asarray(0, jnp.int32))

    def adjust(self, state: LossScale, finite: jax.Array) -> LossScale:
        """Traced: the state after a step whose gradients were all finite (`finite`) or not."""
        good = state.good_steps + 1
        grow = good >= self.growth_interval
        grown = state.scale * self.growth
        grown = jnp.where(jnp.isfinite(grown), grown, state.scale)
        shrunk = jnp.maximum(state.scale * self.backoff, 1.0)
        scale = jnp.where(finite, jnp.where(grow, grown, state.scale), shrunk)
        good_steps = jnp.where(finite & ~grow, good, 0)
        return LossScale(scale.astype(jnp.float32), good_steps.astype(jnp.int32))
