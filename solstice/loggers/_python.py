"""`PythonLogger`: metrics as lines of Python's `logging` module."""

import logging
from collections.abc import Mapping
from typing import Any

from ._closed import check_open
from ._convert import check_scalars, to_floats
from ._hparams import flatten_hparams
from ._logger import Logger


class PythonLogger(Logger):
    """Writes one compact line per call to Python's `logging` module, e.g.

    ```
    step 120: epoch=1 train/loss=0.2531 train/accuracy=0.9219
    ```

    The `epoch` value, when present, comes first. It only emits records; where they go is configured with `logging` as usual. Python shows
    `WARNING` and above by default, so to see the default `INFO` lines call
    `logging.basicConfig(level=logging.INFO)` (or give this logger a higher `level`).

    **Arguments:**

    - `level`: the level of every record (`logging.INFO` by default).
    - `name`: the name of the `logging.Logger` to use (`"solstice"` by default).

    **Example:**

    ```python
    import logging
    logging.basicConfig(level=logging.INFO)
    logger = PythonLogger()
    logger.log_metrics({"train/loss": 0.25, "epoch": 0}, step=10)
    # INFO:solstice:step 10: epoch=0 train/loss=0.25
    ```
    """

    def __init__(self, level: int = logging.INFO, name: str = "solstice"):
        if not isinstance(level, int) or isinstance(level, bool):
            raise TypeError(
                f"`level` must be a logging level such as `logging.INFO`, got {level!r}."
            )
        self.level = level
        self.name = name
        self._logger = logging.getLogger(name)
        self._closed = False

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        if not self._logger.isEnabledFor(self.level):
            check_scalars(metrics)  # still catch mistakes, but copy nothing from the device
            return
        values = to_floats(metrics)
        if "epoch" in values:  # first, so that the lines line up
            values = {"epoch": values.pop("epoch"), **values}
        text = " ".join(f"{key}={value:.4g}" for key, value in values.items())
        self._logger.log(self.level, "step %d: %s", step, text)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        flat = flatten_hparams(params)
        if self._logger.isEnabledFor(self.level):
            text = " ".join(f"{key}={value!r}" for key, value in flat.items())
            self._logger.log(self.level, "hyperparameters: %s", text)

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return f"PythonLogger(level={logging.getLevelName(self.level)}, name={self.name!r})"
