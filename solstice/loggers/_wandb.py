"""`WandBLogger`: metrics and hyperparameters to a Weights & Biases run."""

import logging
import secrets
import string
import threading
from collections.abc import Mapping
from typing import Any

from ._closed import check_open
from ._convert import to_floats
from ._hparams import jsonable_hparams
from ._logger import Logger
from ._media import histogram, to_host_arrays, to_host_images

_STEP = "trainer/global_step"
_ID_CHARACTERS = string.ascii_lowercase + string.digits

log = logging.getLogger("solstice")


def _new_run_id() -> str:
    """A W&B-style run id (8 lowercase letters and digits), chosen before the run starts so
    that checkpoints can record it without starting the run."""
    return "".join(secrets.choice(_ID_CHARACTERS) for _ in range(8))


class WandBLogger(Logger):
    """Logs metrics and hyperparameters to a Weights & Biases run.

    The run starts (`wandb.init(**wandb_init_kwargs)`) at the first call that needs it, not in
    the constructor, so a run restored from a checkpoint can still be resumed; see
    `resume_from`. Metrics are plotted against the Trainer's step: each row carries
    `"trainer/global_step"`, declared as the step metric of every other key (W&B's own
    `_step` counts calls and never goes backwards, which a resumed run may need to do).
    Hyperparameters go to the run's config (nested as given; values that are not numbers,
    bools or strings are stored as strings). `close()` finishes the run.

    The run id is chosen when the logger is built (unless `id`, `resume`, `resume_from` or
    `fork_from` is given), so `run_id` never starts the run. When the Trainer resumes from a
    checkpoint, `resume_at` continues the same run rewound to the records that checkpoint
    counts (W&B's `resume_from="<id>?_step=<n>"`: each record is one `run.log` call, one W&B
    `_step`), so records logged after the checkpoint are not shown twice.

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
        if not any(k in self.init_kwargs for k in ("id", "resume", "resume_from", "fork_from")):
            self.init_kwargs["id"] = _new_run_id()
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
            self.init_kwargs.pop("resume_from", None)
            self.init_kwargs.pop("fork_from", None)
            self.init_kwargs["id"] = run_id
            self.init_kwargs.setdefault("resume", "allow")
        return self

    def resume_at(self, run_id: str | None, records: int) -> int:
        """Continue the W&B run `run_id` right after its first `records` records (a checkpoint
        that counts that many): starts the run now with `resume_from=f"{run_id}?_step={records
        - 1}"`, which rewinds it there (W&B keeps the records logged after it aside, out of
        the run's history). Returns `records`. With `records=0` (nothing to keep: no step to
        rewind to), or if the W&B server refuses to rewind (a preview feature on some
        servers; logged as a warning), the run is continued as it is (`resume="allow"`),
        which may show records logged after the checkpoint twice. With no `run_id`, a new
        run starts, and returns 0: every record is replayed to it.
        """
        if run_id is None:
            return 0
        with self._lock:
            if self._run is not None:
                if self._run.id == run_id:
                    return records  # this very run is live: it holds what it logged
                raise RuntimeError(
                    f"Cannot resume W&B run {run_id!r}: {self!r} has already started run "
                    f"{self._run.id!r}. Call `resume_at` before logging anything."
                )
            for key in ("resume", "resume_from", "fork_from"):
                self.init_kwargs.pop(key, None)
            self.init_kwargs["id"] = run_id
            if records:
                self.init_kwargs["resume_from"] = f"{run_id}?_step={records - 1}"
            else:
                self.init_kwargs["resume"] = "allow"
        try:
            _ = self.run  # start it now: a server that cannot rewind says so here
        except Exception as error:
            if not records:
                raise
            log.warning(
                "W&B could not rewind run %r to its record %d (%s: %s); continuing it as it "
                "is, so records logged after the checkpoint may show twice.",
                run_id,
                records,
                type(error).__name__,
                error,
            )
            with self._lock:
                self.init_kwargs.pop("resume_from", None)
                self.init_kwargs["resume"] = "allow"
            _ = self.run
        return records

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

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """Add each image (a `wandb.Image`) to the run's next row (see `log_histograms`)."""
        check_open(self, self._closed)
        import wandb

        rows = {
            name: wandb.Image(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels)
            for name, pixels in to_host_images(images).items()
        }
        self.run.log(rows, commit=False)

    def log_histograms(self, values: Mapping[str, Any], step: int) -> None:
        """Add a `wandb.Histogram` of each array (`solstice.loggers.histogram`'s bins) to
        the run's next row.

        W&B counts rows (`_step`) and a resume rewinds the run by rows, so images and
        histograms join the next `log_metrics` row (`commit=False`) rather than make rows of
        their own: they are shown at that row's `trainer/global_step`."""
        check_open(self, self._closed)
        import wandb

        rows = {}
        for name, array in to_host_arrays(values).items():
            h = histogram(array)
            rows[name] = wandb.Histogram(np_histogram=(h.counts.tolist(), h.edges.tolist()))
        self.run.log(rows, commit=False)

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
        if self._run is None:
            if self._closed:
                return None
            if self.init_kwargs.get("id"):
                return self.init_kwargs["id"]
        return self.run.id

    def __repr__(self) -> str:
        shown = ("project", "name", "mode", "id")
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_kwargs.items() if k in shown)
        return f"WandBLogger({args})"
