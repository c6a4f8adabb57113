"""`hyperparameters`: a flat dict describing an experiment's static configuration."""

import dataclasses
from typing import Any

import equinox as eqx

from ._population import Population

_SCALARS = (bool, int, float, str, type(None))


def hyperparameters(module: Any, prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """Describe the non-array configuration of an `eqx.Module` as a flat dict.

    Nested modules contribute their type name and, down to `depth` levels, their own scalar
    fields (`"model.in_size": 64`). Arrays are skipped; functions appear by name. A
    `Population`'s recorded hyperparameters appear as `"population.lr": "[0.001, 0.01]"`.

    **Example:**

    ```python
    hyperparameters(experiment)
    # {"experiment": "ClassificationExperiment", "num_classes": 10, "model": "MLP", ...}
    ```
    """
    out: dict[str, Any] = {}
    if not prefix:
        out["experiment"] = type(module).__name__
        if isinstance(module, Population):  # one value per member, e.g. `population.lr`
            out.update({f"population.{k}": str(v) for k, v in module.hparams.items()})
    if not dataclasses.is_dataclass(module):
        return out
    for field in dataclasses.fields(module):
        name = f"{prefix}{field.name}"
        try:
            value = getattr(module, field.name)
        except AttributeError:
            continue
        if isinstance(value, _SCALARS):
            out[name] = value
        elif isinstance(value, eqx.Module):
            out[name] = type(value).__name__
            if depth > 0:
                out.update(hyperparameters(value, f"{name}.", depth - 1))
        elif isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value):
            out[name] = str(list(value))
        elif callable(value) and hasattr(value, "__name__"):
            out[name] = value.__name__
    return out
