"""`PopulationMetrics`: the metrics of a `Population`'s members, stacked, and their summary."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp

from ._metrics import Metrics

#: The population summaries `PopulationMetrics.compute` adds for every member metric.
SUMMARIES: dict[str, Callable[..., Any]] = {"mean": jnp.mean, "min": jnp.min, "max": jnp.max}


def member_key(index: int, key: str) -> str:
    """The name of member `index`'s metric `key`: `member_{index}/{key}`."""
    return f"member_{index}/{key}"


class PopulationMetrics(Metrics):
    """The `Metrics` of every member of a `solstice.Population`, stacked along a leading
    member axis (one module of the members' `Metrics` type whose arrays gain that axis).

    `merge` merges each member's with its counterpart (vmapped); `compute` returns, for
    every metric `key` of the members, `member_{i}/{key}` for each member `i` (restricted to
    `keys` if given) and the population summaries `population/mean/{key}`,
    `population/min/{key}` and `population/max/{key}` over all members (stopped ones
    included). The Trainer prefixes the stage: `val/member_3/accuracy`,
    `val/population/mean/loss`, `train/member_0/loss_epoch`.

    **Arguments:**

    - `members`: the members' metrics, stacked (as `eqx.filter_vmap` of a step returns them).
    - `keys`: the metrics reported per member; `None` (the default): all of them.

    **Example:**

    ```python
    stacked = eqx.filter_vmap(lambda loss: MeanLoss(loss))(jnp.ones((3, 8)))
    metrics = solstice.PopulationMetrics(stacked)
    metrics.compute()["member_2/loss"], metrics.compute()["population/mean/loss"]
    ```
    """

    members: Metrics
    keys: tuple[str, ...] | None = eqx.field(static=True, default=None)

    def merge(self, other: Metrics) -> "PopulationMetrics":
        if not isinstance(other, PopulationMetrics):
            raise TypeError(
                f"`PopulationMetrics.merge` takes another `PopulationMetrics`, got "
                f"`{type(other).__name__}`."
            )
        merged = eqx.filter_vmap(lambda a, b: a.merge(b))(self.members, other.members)
        return PopulationMetrics(merged, self.keys)

    def compute(self) -> dict[str, Any]:
        per_member = eqx.filter_vmap(lambda m: m.compute())(self.members)
        unknown = sorted(set(self.keys or ()) - set(per_member))
        if unknown:
            raise ValueError(
                f"`member_metrics` names {unknown}, which the members' metrics do not "
                f"compute; they compute {sorted(per_member)}."
            )
        out: dict[str, Any] = {}
        for key, values in per_member.items():
            if self.keys is None or key in self.keys:
                for i in range(values.shape[0]):
                    out[member_key(i, key)] = values[i]
            for name, reduce in SUMMARIES.items():
                out[f"population/{name}/{key}"] = reduce(values, axis=0)
        return out
