"""`History`: every logged metric, in memory, as plain lists; and a plot of them."""

import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ._closed import check_open
from ._convert import to_floats
from ._hparams import jsonable_hparams
from ._logger import Logger


def _base_name(name: str) -> str:
    """`"train/loss"` -> `"loss"`; a name without a `/` is its own base."""
    return name.split("/", 1)[1] if "/" in name else name


class History(Logger):
    """Keeps every logged metric in memory, as plain dicts of lists.

    For each metric name (other than `"epoch"`), entry `i` of

    - `history.metrics[name]` is its `i`-th logged value (a `float`),
    - `history.steps[name]` is the step it was logged at (an `int`),
    - `history.epochs[name]` is the `"epoch"` value logged with it (an `int`; `None` if that
      call had no `"epoch"` key).

    So `zip(history.steps["val/loss"], history.metrics["val/loss"])` is the validation-loss
    curve. `history.hparams` holds the logged hyperparameters (nested as given, values made
    JSON-able). `state_dict()` returns all of it as one JSON-able dict, and
    `load_state_dict` restores it, so a history can be saved with a checkpoint.

    The Trainer keeps one as `trainer.history`. It is safe to read while another thread
    logs (e.g. inside an `AsyncLogger`); call the Trainer's (or the `AsyncLogger`'s) `flush`
    first to see everything.

    **Example:**

    ```python
    history = History()
    history.log_metrics({"train/loss": 0.9, "epoch": 0}, step=10)
    history.log_metrics({"train/loss": 0.5, "val/loss": 0.7, "epoch": 1}, step=20)
    history.metrics  # {"train/loss": [0.9, 0.5], "val/loss": [0.7]}
    history.steps    # {"train/loss": [10, 20], "val/loss": [20]}
    history.epochs   # {"train/loss": [0, 1], "val/loss": [1]}
    history.plot("curves.png")  # needs matplotlib: pip install 'solstice[plot]'
    ```
    """

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = {}
        self.steps: dict[str, list[int]] = {}
        self.epochs: dict[str, list[int | None]] = {}
        self.hparams: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._closed = False

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        values = to_floats(metrics)
        epoch = values.pop("epoch", None)
        epoch = None if epoch is None else int(epoch)
        with self._lock:
            for name, value in values.items():
                self.metrics.setdefault(name, []).append(value)
                self.steps.setdefault(name, []).append(int(step))
                self.epochs.setdefault(name, []).append(epoch)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        with self._lock:
            self.hparams.update(jsonable_hparams(params))

    def close(self) -> None:
        self._closed = True

    def state_dict(self) -> dict[str, Any]:
        """Everything recorded, as a JSON-able dict (copies of the lists)."""
        with self._lock:
            return {
                "metrics": {k: list(v) for k, v in self.metrics.items()},
                "steps": {k: list(v) for k, v in self.steps.items()},
                "epochs": {k: list(v) for k, v in self.epochs.items()},
                "hparams": dict(self.hparams),
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace what is recorded with `state` (from `state_dict`)."""
        missing = {"metrics", "steps", "epochs", "hparams"} - set(state)
        if missing:
            raise ValueError(
                f"History state is missing {sorted(missing)}; expected the dict returned by "
                "`History.state_dict()`."
            )
        with self._lock:
            self.metrics = {k: [float(x) for x in v] for k, v in state["metrics"].items()}
            self.steps = {k: [int(x) for x in v] for k, v in state["steps"].items()}
            self.epochs = {
                k: [None if x is None else int(x) for x in v] for k, v in state["epochs"].items()
            }
            self.hparams = dict(state["hparams"])

    def plot(self, path: str | os.PathLike, *, names: Sequence[str] | None = None) -> str:
        """Write a PNG of the curves: one subplot per base name, with `train/x`, `val/x` and
        `test/x` (any `prefix/x`) drawn together against the step.

        **Arguments:**

        - `path`: where to write the PNG (its directory must exist).
        - `names`: the metric names to draw (default: all of them).

        **Returns:**

        `path`, as a string.

        Needs matplotlib (`pip install 'solstice[plot]'`); draws off-screen (Agg), so it
        works without a display and from any thread.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                "History.plot needs matplotlib, which is not installed. Install it with "
                "`pip install 'solstice[plot]'`."
            ) from error
        with self._lock:
            curves = {
                name: (list(self.steps[name]), list(self.metrics[name])) for name in self.metrics
            }
        if names is not None:
            unknown = [name for name in names if name not in curves]
            if unknown:
                raise ValueError(
                    f"History has no metric(s) {unknown}; the logged metrics are {sorted(curves)}."
                )
            curves = {name: curves[name] for name in names}
        if not curves:
            raise ValueError(
                "History is empty: there is nothing to plot. Log metrics first (the Trainer "
                "does so every `log_every_n_steps` steps and at the end of each validation)."
            )
        groups: dict[str, list[str]] = {}
        for name in curves:
            groups.setdefault(_base_name(name), []).append(name)

        ncols = min(3, len(groups))
        nrows = math.ceil(len(groups) / ncols)
        figure = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (base, members) in zip(axes, groups.items()):
            for name in members:
                steps, values = curves[name]
                marker = "o" if len(values) < 30 else None
                ax.plot(steps, values, marker=marker, markersize=3, label=name)
            ax.set_title(base)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        for ax in axes[len(groups) :]:
            ax.set_visible(False)
        path = os.fspath(path)
        figure.savefig(path, format="png", dpi=100)
        return path

    def __repr__(self) -> str:
        return f"History({len(self.metrics)} metrics)"
