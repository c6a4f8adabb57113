"""`NormMonitor`: global norms of the gradients, parameters and updates, computed in the step."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._in_step import InStep, StepData
from .._optimizer_tap import OptimizerCall
from ._callback import Callback
from ._intervals import is_train_interval
from ._lr_monitor import find_optimizers

_KINDS = (("grad_norm", "grads"), ("param_norm", "params"), ("update_norm", "updates"))


def global_norm(tree: PyTree) -> jax.Array:
    """The L2 norm of every floating-point leaf of `tree` together, in float32 (a bf16
    sum of squares would overflow or lose the small leaves); 0 for a tree without any."""
    squares = [
        jnp.sum(jnp.square(x.astype(jnp.float32)))
        for x in jax.tree.leaves(tree)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def _top_level(tree: PyTree) -> dict[str, PyTree]:
    """`tree`'s leaves grouped by their first path entry (`"encoder"`, `"layers"`, `"0"`)."""
    groups: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = jax.tree_util.keystr(path[:1], simple=True, separator=".") if path else "."
        groups.setdefault(name, []).append(leaf)
    return groups


class OptimizerNorms(InStep):
    """The in-step reduction of `NormMonitor`: the norms of the latest step's optimizer
    calls, by metric name (float32 scalars).

    **Arguments:**

    - `per_module`: also one norm per top-level module of `experiment.model`.
    """

    uses_optimizer_calls = True

    def __init__(self, per_module: bool = False):
        self.per_module = per_module

    def init(self, experiment: Any) -> dict[str, jax.Array]:
        zero = jnp.zeros((), jnp.float32)
        return {name: zero for name in self.names(experiment)}

    def _prefixes(self, experiment: Any) -> list[str]:
        paths = list(find_optimizers(experiment))
        return [f"{p}/" for p in paths] if len(paths) > 1 else [""] * len(paths)

    def names(self, experiment: Any) -> list[str]:
        """The names of the norms for `experiment`, before any step."""
        modules: list[str] = []
        if self.per_module:
            modules = list(_top_level(eqx.filter(_model_of(experiment), eqx.is_array)))
        return [
            f"{prefix}{kind}{suffix}"
            for prefix in self._prefixes(experiment)
            for kind, _ in _KINDS
            for suffix in ["", *(f"/{m}" for m in modules)]
        ]

    def norms(self, calls: tuple[OptimizerCall, ...], experiment: Any) -> dict[str, jax.Array]:
        """Traced: `{"grad_norm": ..., "grad_norm/<module>": ...}` for each optimizer call
        (prefixed by the optimizer's path, `"<path>/grad_norm"`, when there are several)."""
        out = {}
        for prefix, call in zip(self._prefixes(experiment), calls, strict=True):
            for kind, field in _KINDS:
                tree = getattr(call, field)
                if tree is None:  # called without `params`: reported as 0
                    tree = ()
                out[prefix + kind] = global_norm(tree)
                if self.per_module:
                    for module, leaves in _top_level(tree).items():
                        out[f"{prefix}{kind}/{module}"] = global_norm(leaves)
        return out

    def update(self, carry: dict[str, jax.Array], data: StepData) -> dict[str, jax.Array]:
        out = self.norms(data.optimizer_calls, data.previous)
        if out.keys() != carry.keys():
            raise ValueError(
                f"`NormMonitor(per_module=True)` groups the norms by the top-level modules of "
                f"`experiment.model` ({sorted(carry)}), but the optimizer was handed a tree "
                f"with other top-level entries ({sorted(out)}). Pass the optimizer gradients "
                "shaped like the model (`eqx.filter_grad(loss)(self.model)`), or use "
                "`NormMonitor()` for the global norms only."
            )
        return out

    def __repr__(self) -> str:
        return f"OptimizerNorms(per_module={self.per_module})"


def _model_of(experiment: Any) -> Any:
    model = getattr(experiment, "model", None)
    if model is None or len(find_optimizers(experiment)) != 1:
        raise ValueError(
            f"`NormMonitor(per_module=True)` reports one norm per top-level module of "
            f"`experiment.model`, for an experiment with one optimizer; "
            f"`{type(experiment).__name__}` has "
            f"{'no `model` field' if model is None else 'several optimizers'}. Use "
            "`NormMonitor()` for the global norms (one set per optimizer)."
        )
    return model


class NormMonitor(Callback):
    """Logs the global L2 norms of the gradients, parameters and updates of every training
    step's optimizer call: `train/grad_norm`, `train/param_norm`, `train/update_norm`.

    The norms are computed inside the compiled training step (an in-step reduction that
    sees what `train_step` hands each `solstice.Optimizer`, see `solstice.InStep`), so they
    are exactly those of the step, in float32, and reading them costs no synchronisation:
    at each training log interval (every `log_every_n_steps` steps and at epoch ends) the
    callback logs the on-device values, converted on the logging thread.

    **What is logged for a log interval** is the norms of the interval's *last* step (the
    step the record is logged at), as Lightning's per-step logging does; between log
    intervals each step overwrites the last. With `log_every_n_steps=1` every step is
    logged (Levanter's `watch`).

    With `per_module=True` it also logs one norm per top-level module of `experiment.model`
    (`train/grad_norm/<name>`, e.g. `train/grad_norm/layers` or `train/grad_norm/encoder`);
    the optimizer must then receive trees shaped like the model. With several optimizers
    the names carry the optimizer's path: `train/<path>/grad_norm` (e.g.
    `train/generator_opt/grad_norm`). An optimizer called without `params` logs a
    `param_norm` of 0.

    **Arguments:**

    - `per_module`: also log the norms of each top-level module of the model.

    **Example:**

    ```python
    trainer = solstice.Trainer(max_epochs=3, callbacks=[NormMonitor(per_module=True)])
    ```
    """

    _reads_experiment = False

    def __init__(self, per_module: bool = False):
        if not isinstance(per_module, bool):
            raise TypeError(f"`NormMonitor(per_module=...)` must be a bool, got {per_module!r}.")
        self.per_module = per_module
        self._reduction = OptimizerNorms(per_module)

    def in_step(self) -> InStep:
        return self._reduction

    def on_log(self, trainer, experiment, metrics: dict[str, Any], step: int) -> None:
        if trainer.progress.stage != "train":
            return
        if not is_train_interval(metrics):
            return
        norms = trainer.in_step_value(self)  # on the device: no read here
        trainer.log_metrics({f"train/{k}": v for k, v in norms.items()}, step)
