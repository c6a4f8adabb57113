"""Checks of what a user's step returns, made while tracing (so once per compilation).

A step that returns the wrong types, metrics that are not arrays or not scalars, a
`train_step` that returns its input: each is an error or a warning naming the mistake and
the fix, never a plausible wrong number. An error raised inside the user's step gets a note
listing the batch it was traced on.
"""

from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree

from .._experiment import Experiment
from .._metrics import Metrics
from ._user_code import warn_at


def check_train_output(out: Any, experiment: Experiment) -> tuple[Experiment, Metrics]:
    name = type(experiment).__name__
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"`{name}.train_step` must return a tuple `(experiment, metrics)`, got "
            f"`{type(out).__name__}`. End it with `return new_experiment, metrics`."
        )
    new, metrics = out
    if not isinstance(new, Experiment):
        raise TypeError(
            f"`{name}.train_step` must return `(Experiment, Metrics)`, but its first element "
            f"is a `{type(new).__name__}`. Return the updated experiment first, e.g. "
            "`eqx.tree_at(lambda e: e.model, self, new_model), metrics`."
        )
    if not isinstance(metrics, Metrics):
        raise TypeError(
            f"`{name}.train_step` must return `(Experiment, Metrics)`, but its second element "
            f"is a `{type(metrics).__name__}`. Wrap the values in a `solstice.Metrics` "
            "subclass (e.g. `solstice.ClassificationMetrics`)."
        )
    return new, metrics


def check_metrics(out: Any, experiment: Experiment, method: str) -> Metrics:
    if not isinstance(out, Metrics):
        raise TypeError(
            f"`{type(experiment).__name__}.{method}` must return a `solstice.Metrics`, got "
            f"`{type(out).__name__}`."
        )
    return out


def call_step(experiment: Experiment, method: str, batch: PyTree) -> Any:
    """`experiment.<method>(batch)` while tracing; an error it raises (a shape the model
    rejects, say) gets a note listing the batch's leaves, by path, with their shapes."""
    try:
        return getattr(experiment, method)(batch)
    except Exception as error:
        add_note = getattr(error, "add_note", None)  # Python 3.11+
        if add_note is not None:
            leaves = ", ".join(
                f"`batch{jax.tree_util.keystr(path)}`: {getattr(x, 'dtype', type(x).__name__)}"
                f"{list(getattr(x, 'shape', ()))}"
                for path, x in jax.tree_util.tree_leaves_with_path(batch)
            )
            add_note(
                f"(Solstice) raised while tracing `{type(experiment).__name__}.{method}` on a "
                f"batch with leaves {leaves}. If a size does not match what the model "
                "expects, that batch leaf (or the model's size) is the one to fix."
            )
        raise


def scalar_metrics(values: dict[str, Any], stage: str) -> dict[str, Any]:
    """`compute()`'s values, checked (while tracing) to be scalars: loggers take numbers."""
    for name, value in values.items():
        shape = getattr(value, "shape", ())
        if shape != ():
            raise ValueError(
                f"The {stage} metric `{name}` has shape {tuple(shape)}, but every value "
                "`Metrics.compute()` returns must be a scalar (loggers record numbers). Reduce "
                f"it (e.g. `jnp.mean`), or return each element under its own name "
                f"(`{{f'{name}_{{i}}': v for i, v in enumerate(values)}}`)."
            )
    return values


def check_metric_leaves(metrics: Metrics, method: str) -> None:
    """Every leaf of a step's `Metrics` must be an array: anything else is not traced, so it
    would keep its first value for the whole run (a silent wrong number)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(metrics):
        if not (eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)):
            field = f"{type(metrics).__name__}{jax.tree_util.keystr(path)}"
            raise TypeError(
                f"`{field}` is a `{type(leaf).__name__}` ({leaf!r}) in the metrics that "
                f"`{method}` returned, not an array. A `Metrics` field that is not an array is "
                "not traced: it would keep its first value for the whole run. Store it as an "
                f"array, e.g. `self.count = jnp.asarray(labels.shape[0], jnp.float32)`, or "
                "mark configuration `eqx.field(static=True)`."
            )


def warn_if_unchanged(new: Experiment, dyn: PyTree) -> None:
    """Warn (at trace time, so once per compilation) when `train_step` returns its input."""
    leaves, new_leaves = jax.tree.leaves(dyn), jax.tree.leaves(eqx.filter(new, eqx.is_array))
    if leaves and all(a is b for a, b in zip(leaves, new_leaves)):
        warn_at(
            getattr(type(new), "train_step", None),
            f"`{type(new).__name__}.train_step` returned an experiment whose arrays are all "
            "its input's, so training changes nothing. Return the updated experiment, e.g. "
            "`return eqx.tree_at(lambda e: (e.model, e.optimizer), self, (model, optimizer)), "
            "metrics`.",
            UserWarning,
        )
