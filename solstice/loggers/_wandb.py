"""`WandBLogger`: metrics and hyperparameters to a Weights & Biases run."""

import threading
from collections.abc import Mapping
from typing import Any

from ._closed import check_open
from ._convert import to_floats
from ._hparams import jsonable_hparams
from ._logger import Logger

_STEP = "trainer/global_step"


class WandBLogger(Logger):
    """Logs metrics and hyperparameters to a Weights & Biases run.

    The run starts (`wandb.init(**wandb_init_kwargs)`) at the first call that needs it, not in
    the constructor, so a run restored from a checkpoint can still be resumed; see
    `resume_from`. Metrics are plotted against the Trainer's step: each row carries
    `"trainer/global_step"`, declared as the step metric of every other key (W&B's own
    `_step` counts calls and never goes backwards, which a resumed run may need to do).
    Hyperparameters go to the run's config (nested as given; values that are not numbers,
    bools or strings are stored as strings). `close()` finishes the run.

    Works offline with `mode="offline"` (sync later with `wandb sync`). W&B's own service
    process writes the run's files: it completes them shortly after `close()` returns, and
    before the interpreter exits. Needs `wandb`
    (`pip install 'solstice[wandb]'`).

    **Arguments:**

    - `**wandb_init_kwargs`: passed to `wandb.init`, e.g. `project`, `name`, `mode`, `dir`,
      `config`, `settings`, and `id` with `resume="allow"` to continue a known run.

    **Example:**

    ```python
    logger = WandBLogger(project="digits", mode="offline")
    logger.log_metrics({"train/loss": 0.25, "epoch": 0}, step=10)
    saved_id = logger.run_id  # stored in checkpoints by the Trainer
    logger.close()

    # later, resuming from the checkpoint: the same W&B run continues
    logger = WandBLogger(project="digits", mode="offline").resume_from(saved_id)
    ```
    """

    def __init__(self, **wandb_init_kwargs: Any):
        try:
            import wandb  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "WandBLogger needs wandb, which is not installed. Install it with "
                "`pip install 'solstice[wandb]'`."
            ) from error
        self.init_kwargs = dict(wandb_init_kwargs)
        self._run: Any = None
        self._lock = threading.Lock()
        self._closed = False

    def resume_from(self, run_id: str) -> "WandBLogger":
        """Continue the W&B run `run_id` (a `run_id` saved earlier) instead of starting a new
        one: sets `id=run_id, resume="allow"` for `wandb.init`. Call it before anything is
        logged. Returns this logger.

        Raises `RuntimeError` if this logger's run has already started with another id.
        """
        if not isinstance(run_id, str) or not run_id:
            raise TypeError(f"`run_id` must be a non-empty string (a W&B run id), got {run_id!r}.")
        with self._lock:
            if self._run is not None:
                if self._run.id == run_id:
                    return self
                raise RuntimeError(
                    f"Cannot resume W&B run {run_id!r}: {self!r} has already started run "
                    f"{self._run.id!r}. Call `resume_from` before logging anything."
                )
            self.init_kwargs["id"] = run_id
            self.init_kwargs.setdefault("resume", "allow")
        return self

    @property
    def run(self) -> Any:
        """The `wandb` run, started now if it has not been yet."""
        with self._lock:
            if self._run is None:
                check_open(self, self._closed, "start a W&B run")
                import wandb

                run = wandb.init(**self.init_kwargs)
                run.define_metric(_STEP)
                run.define_metric("*", step_metric=_STEP)
                self._run = run
            return self._run

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        values = to_floats(metrics)
        values[_STEP] = int(step)
        self.run.log(values)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        config = jsonable_hparams(params)
        self.run.config.update(config, allow_val_change=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            run = self._run
        if run is not None:
            run.finish()

    @property
    def run_id(self) -> str | None:
        """The W&B run id: of the started run, else the `id` this logger will use (starting
        the run if none was chosen yet); `None` if closed before any run started."""
        if self._run is None and self.init_kwargs.get("id"):
            return self.init_kwargs["id"]
        if self._run is None and self._closed:
            return None
        return self.run.id

    def __repr__(self) -> str:
        shown = ("project", "name", "mode", "id")
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_kwargs.items() if k in shown)
        return f"WandBLogger({args})"
