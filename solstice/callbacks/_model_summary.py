"""`ModelSummary`: a table of parameter counts, shapes and bytes per submodule."""

import logging
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ._callback import Callback

_log = logging.getLogger("solstice")


def _arrays(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def _row(name: str, tree: Any) -> tuple[str, str, int, int, str]:
    arrays = _arrays(tree)
    params = sum(int(np.prod(x.shape)) for x in arrays if eqx.is_inexact_array(x))
    nbytes = sum(int(x.size) * x.dtype.itemsize for x in arrays)
    shapes = ", ".join(str(tuple(x.shape)) for x in arrays[:4])
    if len(arrays) > 4:
        shapes += f", ... (+{len(arrays) - 4})"
    return name, type(tree).__name__, params, nbytes, shapes


def _children(module: Any, prefix: str, depth: int) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(module, (list, tuple)):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(module)]
    elif isinstance(module, eqx.Module):
        items = [(f"{prefix}.{k}" if prefix else k, v) for k, v in vars(module).items()]
    else:
        return out
    for name, value in items:
        if not _arrays(value):
            continue
        out.append((name, value))
        if depth > 1:
            out.extend(_children(value, name, depth - 1))
    return out


def summarize(module: Any, depth: int = 2) -> str:
    """Return a text table of `module`'s submodules: type, parameters, bytes, shapes.

    Parameters are the floating-point array elements; bytes count every array (PRNG keys,
    optimizer state and integer counters included).
    """
    rows = [_row(name, value) for name, value in _children(module, "", depth)]
    total = _row(type(module).__name__, module)
    model_params = _row("", getattr(module, "model", module))[2]
    header = ("Name", "Type", "Params", "Bytes", "Shapes")
    table = [header] + [(n, t, f"{p:,}", f"{b:,}", s) for n, t, p, b, s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in table]
    rule = "-" * max(len(line) for line in lines)
    lines.insert(1, rule)
    lines += [
        rule,
        f"Model parameters: {model_params:,}; all state: {total[3]:,} bytes "
        f"({total[3] / 2**20:.2f} MiB)",
    ]
    return "\n".join(lines)


class ModelSummary(Callback):
    """At fit start, logs a table of parameter counts and shapes per submodule; at the
    first training log interval, the FLOPs of a training step.

    The table goes to the `"solstice"` Python logger at INFO level and is kept as
    `model_summary.table`; `total_params` (floating-point elements of `experiment.model`, or
    of the whole experiment if it has no `model`) and `total_bytes` (every array of the
    experiment: model, optimizer state, keys) are kept too. `flops_per_step` is the FLOPs
    of one training step (forward, backward and update, summed over the devices), from
    XLA's cost analysis of the compiled step (`trainer.train_step_cost()`), known once the
    first step has been compiled.

    **Arguments:**

    - `max_depth`: how many levels of submodules to list.

    **Example:**

    ```python
    trainer = solstice.Trainer(max_epochs=1, callbacks=[ModelSummary(max_depth=3)])
    ```
    """

    def __init__(self, max_depth: int = 2):
        if max_depth < 1:
            raise ValueError(f"`max_depth` must be >= 1, got {max_depth}.")
        self.max_depth = max_depth
        self.table: str | None = None
        self.total_params = 0
        self.total_bytes = 0
        self.flops_per_step: float | None = None

    def on_fit_start(self, trainer, experiment) -> None:
        self.table = summarize(experiment, self.max_depth)
        self.total_params = _row("", getattr(experiment, "model", experiment))[2]
        self.total_bytes = _row("", experiment)[3]
        _log.info("Model summary:\n%s", self.table)
        self.flops_per_step = None

    def on_log(self, trainer, experiment, metrics: dict[str, Any], step: int) -> None:
        if self.flops_per_step is not None or trainer.progress.stage != "train":
            return
        cost = trainer.train_step_cost()
        if cost is None:
            return
        self.flops_per_step = cost.flops
        _log.info(
            "Model summary: a training step is %s FLOPs (%.3g GFLOPs; XLA's cost analysis of "
            "the compiled step, over %d device(s)).",
            f"{cost.flops:,.0f}",
            cost.flops / 1e9,
            cost.num_devices,
        )
