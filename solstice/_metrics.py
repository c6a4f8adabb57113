"""The `Metrics` abstraction: immutable, mergeable accumulators of step results."""

import abc
from typing import Any

import equinox as eqx


class Metrics(eqx.Module):
    """Accumulates the results of steps on the device; computes final values at the end.

    A `Metrics` object is an immutable value (an `equinox.Module`): `merge` returns a new one.
    `merge` must be associative, so the Trainer can combine per-step, per-interval and
    per-device results in any grouping. `compute` turns the accumulated state into a flat
    `dict` of scalars; it is traced and runs on the device, the Trainer converts to Python
    numbers only at log intervals.

    **Example:**

    ```python
    class MeanLoss(solstice.Metrics):
        total: jax.Array
        count: jax.Array

        def __init__(self, loss):
            self.total = jnp.sum(loss)
            self.count = jnp.asarray(loss.size, jnp.float32)

        def merge(self, other):
            return eqx.tree_at(lambda m: (m.total, m.count), self,
                               (self.total + other.total, self.count + other.count))

        def compute(self):
            return {"loss": self.total / self.count}
    ```
    """

    @abc.abstractmethod
    def merge(self, other: "Metrics") -> "Metrics":
        """Combine with `other` (same type, from another batch); must be associative."""

    @abc.abstractmethod
    def compute(self) -> dict[str, Any]:
        """Return the final values as a flat `dict[str, scalar array]`."""
