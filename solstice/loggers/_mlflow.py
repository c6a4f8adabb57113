"""`MLFlowLogger`: metrics, hyperparameters, images, histograms and checkpoints in an MLflow run."""

import os
import re
import time
from collections.abc import Mapping
from typing import Any, Literal

from ._closed import check_open
from ._convert import to_floats
from ._failures import Notice, report_failure
from ._hparams import flatten_hparams
from ._logger import Logger
from ._media import histogram, to_host_arrays, to_host_images

RECORDS_TAG = "solstice.records"  # records the run holds (set with the batch that ends them)
PENDING_TAG = "solstice.records_pending"  # records it holds once the batch being sent lands
RESUMED_FROM_TAG = "solstice.resumed_from"
SUPERSEDED_BY_TAG = "solstice.superseded_by"
CHECKPOINT_TAG = "checkpoint/last"
_INVALID_KEY_CHARACTERS = re.compile(r"[^-/\w. :]")
_MAX_METRICS = 1000  # per `log_batch` call (MLflow's limit)
_MAX_PARAMS = 100


def _key(name: str) -> str:
    """A valid MLflow metric/param/tag name for `name`: characters MLflow refuses become `_`,
    with no leading `/`."""
    return _INVALID_KEY_CHARACTERS.sub("_", name).lstrip("/") or "_"


def _now_ms() -> int:
    return int(time.time() * 1000)


class MLFlowLogger(Logger):
    """Logs to an MLflow run: metrics, hyperparameters (as params), images, histograms and
    checkpoints, against any MLflow tracking store (`sqlite:///...`, a server, Databricks).

    Lightning's `MLFlowLogger`, with its names. The run is created (in `experiment_name`,
    made if missing) at the first call that writes, on the logger's own thread; `run_id`
    is `None` until then (or the `run_id` given, to continue that run). Metrics are
    buffered and sent in batches (`log_batch`) every `flush_secs` seconds, at `flush()`
    and at `close()`, which also marks the run `FINISHED`; each record has a timestamp of its
    own (MLflow keeps one of several equal metrics with the same step and timestamp). Metric and param names keep
    their `/` (MLflow groups them); characters MLflow refuses become `_`.

    - **Hyperparameters** are params, flattened to `outer/inner` and stored as strings.
      MLflow keeps a param's first value: a different later value (a resumed run given a
      larger `max_epochs`) is kept as the tag `updated/<name>`.
    - **Images** (`log_images`) are MLflow images (`MlflowClient.log_image` with the key
      and step, shown in the run's image view); **histograms** (`log_histograms`), which
      MLflow has no type for, are JSON artifacts `histograms/<name>/<step>.json` holding
      `solstice.loggers.histogram`'s `edges`, `counts`, `num`, `min`, `max`, `sum` and
      `sum_squares`.
    - **Checkpoints:** the path of each checkpoint `ModelCheckpoint` commits is set as the
      tag `checkpoint/last`. With `log_model=True` the checkpoints still kept when the
      logger closes (after `ModelCheckpoint`'s retention) are copied as artifacts
      `checkpoints/<name>/`; with `log_model="all"` each one is copied as soon as it is
      committed (on the logger's thread: one that retention deletes before then is skipped,
      with a warning). Copies take the logger's time: the Trainer waits at most
      `LoggingCallback.flush_timeout` seconds for `close()`, so copy large checkpoints with
      `"all"` (spread over the run) rather than `True` (all at the end).
    - **Resume** (`resume_at`): every batch of metrics carries the number of records the
      run holds (the tag `solstice.records`). MLflow cannot delete metrics, so when the
      Trainer resumes from a checkpoint: a run holding at most the records the checkpoint
      counts is continued (the Trainer replays those it lacks); a run holding more
      (records logged after the checkpoint), or whose last batch may have landed only in
      part (the process died while sending it), is left as it is, tagged
      `solstice.superseded_by=<new run id>`, and a new run (tagged
      `solstice.resumed_from=<old run id>`) receives every record again from
      `trainer.history`. Either way the run the logger writes to holds each record once,
      as if the run had never stopped. Images, histograms and checkpoint artifacts stay
      with the run that logged them. A checkpoint taken before the logger's thread has set
      up its run records no run id: resuming from it starts a new run, which gets every
      record.

    Needs MLflow (`pip install 'solstice[mlflow]'`: `mlflow-skinny`, SQLAlchemy and Alembic
    for a local `sqlite:///` store, and Pillow for images). MLflow 3 refuses the old file
    store (`./mlruns`) unless `MLFLOW_ALLOW_FILE_STORE=true`: use SQLite locally.

    **Arguments:**

    - `experiment_name`: the MLflow experiment of the run (created if missing).
    - `run_name`: the run's name (MLflow picks one if `None`).
    - `tracking_uri`: where runs are stored, e.g. `"sqlite:///mlflow.db"` or
      `"http://host:5000"`. Default: MLflow's (`MLFLOW_TRACKING_URI`, else
      `sqlite:///mlflow.db` in the working directory).
    - `tags`: tags of a new run.
    - `log_model`: copy checkpoints as artifacts: `False` (only their paths, as a tag),
      `True` (those kept, at `close()`) or `"all"` (each when committed).
    - `artifact_location`: where a new experiment keeps its artifacts (default MLflow's:
      `./mlruns` beside a SQLite store's working directory).
    - `run_id`: continue this existing run instead of creating one.
    - `flush_secs`: how often buffered metrics are sent while logging.

    **Example:**

    ```python
    logger = MLFlowLogger("digits", tracking_uri="sqlite:///mlflow.db", log_model=True)
    trainer = solstice.Trainer(max_epochs=3, loggers=[logger], callbacks=[ModelCheckpoint("ckpts")])
    trainer.fit(experiment, Digits(batch_size=64))
    trainer.close()
    MlflowClient("sqlite:///mlflow.db").get_metric_history(logger.run_id, "val/accuracy")
    ```
    """

    def __init__(
        self,
        experiment_name: str = "solstice_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        log_model: bool | Literal["all"] = False,
        artifact_location: str | None = None,
        run_id: str | None = None,
        flush_secs: float = 5.0,
    ):
        try:
            import mlflow
        except ImportError as error:
            raise ImportError(
                "MLFlowLogger needs MLflow, which is not installed. Install it with "
                "`pip install 'solstice[mlflow]'`."
            ) from error
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ValueError(
                f"`experiment_name` must be a non-empty string, got {experiment_name!r}."
            )
        if log_model not in (True, False, "all"):
            raise ValueError(
                f"`log_model` must be False (record checkpoint paths only), True (copy the "
                f"kept checkpoints at close) or 'all' (copy each one), got {log_model!r}."
            )
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise TypeError(
                f"`run_id` must be a non-empty string (an MLflow run id), got {run_id!r}."
            )
        if (
            isinstance(flush_secs, bool)
            or not isinstance(flush_secs, int | float)
            or flush_secs < 0
        ):
            raise ValueError(
                f"`flush_secs` must be a number of seconds >= 0 (between sends), got {flush_secs!r}."
            )
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tracking_uri = tracking_uri if tracking_uri is not None else mlflow.get_tracking_uri()
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.log_model = log_model
        self.artifact_location = artifact_location
        self.flush_secs = float(flush_secs)
        self._client: Any = None
        self._experiment_id: str | None = None
        self._run_id: str | None = run_id
        self._started = False  # whether `_run_id` is a run this logger has set up
        self._buffer: list[Any] = []  # metrics not sent yet
        self._records = 0  # records (`log_metrics` calls) the run holds, sent or not
        self._sent = 0  # records sent
        self._params: dict[str, str] = {}  # the run's params
        self._checkpoints: dict[str, str] = {}  # path -> name, to copy at close (log_model=True)
        self._last_send = time.monotonic()
        self._timestamp = 0  # of the last record, in ms
        self._closed = False

    # ------------------------------------------------------------------ the run
    @property
    def experiment(self) -> Any:
        """The `mlflow.MlflowClient` of `tracking_uri` (Lightning's name)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        """The id of the experiment `experiment_name` (created if missing)."""
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            client = self.experiment
            found = client.get_experiment_by_name(self.experiment_name)
            if found is None:
                try:
                    self._experiment_id = client.create_experiment(
                        self.experiment_name, artifact_location=self.artifact_location
                    )
                except MlflowException:  # created meanwhile by another process
                    found = client.get_experiment_by_name(self.experiment_name)
                    if found is None:
                        raise
            if found is not None:
                self._experiment_id = found.experiment_id
        assert self._experiment_id is not None
        return self._experiment_id

    @property
    def run_id(self) -> str | None:
        """The MLflow run id: of the run this logger writes to, once it has written (or the
        `run_id` it continues); `None` before."""
        return self._run_id

    def _run(self) -> str:
        """The id of the run to write to, set up at the first call that writes."""
        check_open(self, self._closed, "start an MLflow run")
        if not self._started:
            if self._run_id is None:
                self._run_id = self._new_run(self.tags)
            else:
                self._continue(self._run_id)
            self._started = True
        assert self._run_id is not None
        return self._run_id

    def _new_run(self, tags: Mapping[str, str]) -> str:
        from mlflow.tracking.context.registry import resolve_tags

        run = self.experiment.create_run(
            self.experiment_id, run_name=self.run_name, tags=resolve_tags(dict(tags))
        )
        self._records = self._sent = 0
        self._params = {}
        return run.info.run_id

    def _continue(self, run_id: str) -> None:
        run = self.experiment.get_run(run_id)
        self.experiment.update_run(run_id, status="RUNNING")
        self._records = self._sent = int(run.data.tags.get(RECORDS_TAG, 0))
        self._params = dict(run.data.params)

    # ------------------------------------------------------------------ logging
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        values = to_floats(metrics)
        self._run()
        from mlflow.entities import Metric

        # MLflow keeps one of several metrics equal in key, value, step and timestamp (two
        # records of the same step within a millisecond, e.g. `epoch`): each record gets a
        # timestamp of its own.
        now, step = max(_now_ms(), self._timestamp + 1), int(step)
        self._timestamp = now
        self._buffer.extend(Metric(_key(k), v, now, step) for k, v in values.items())
        self._records += 1
        if (
            len(self._buffer) >= _MAX_METRICS
            or time.monotonic() - self._last_send >= self.flush_secs
        ):
            self._send()

    def _send(self) -> None:
        """Send the buffered metrics, with the number of records they bring the run to:
        `solstice.records_pending` first, then the metrics, then `solstice.records` with the
        last batch (so a resume knows whether the last send landed whole)."""
        self._last_send = time.monotonic()
        if self._sent == self._records or self._run_id is None:
            return
        from mlflow.entities import RunTag

        client, run_id, target = self.experiment, self._run_id, self._records
        client.set_tag(run_id, PENDING_TAG, str(target))
        chunks = [
            self._buffer[i : i + _MAX_METRICS] for i in range(0, len(self._buffer), _MAX_METRICS)
        ]
        for i, chunk in enumerate(chunks or [[]]):
            last = i == max(len(chunks), 1) - 1
            tags = [RunTag(RECORDS_TAG, str(target))] if last else []
            client.log_batch(run_id, metrics=chunk, tags=tags)
        self._buffer = []
        self._sent = target

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        run_id = self._run()
        new, changed = [], []
        for name, value in flatten_hparams(params).items():
            key, text = _key(name), str(value)[:MAX_PARAM_VAL_LENGTH]
            if key not in self._params:
                self._params[key] = text
                new.append(Param(key, text))
            elif self._params[key] != text:
                changed.append(RunTag(f"updated/{key}", text))
        for i in range(0, len(new), _MAX_PARAMS):
            self.experiment.log_batch(run_id, params=new[i : i + _MAX_PARAMS])
        for i in range(0, len(changed), _MAX_PARAMS):
            self.experiment.log_batch(run_id, tags=changed[i : i + _MAX_PARAMS])

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """Log each image with `MlflowClient.log_image(key=name, step=step)`."""
        check_open(self, self._closed)
        run_id = self._run()
        for name, pixels in to_host_images(images).items():
            image = pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels
            self.experiment.log_image(run_id, image, key=_key(name), step=int(step))

    def log_histograms(self, values: Mapping[str, Any], step: int) -> None:
        """Write each histogram as the JSON artifact `histograms/<name>/<step>.json`."""
        check_open(self, self._closed)
        run_id = self._run()
        for name, array in to_host_arrays(values).items():
            h = histogram(array)
            data = {
                "step": int(step),
                "edges": h.edges.tolist(),
                "counts": h.counts.tolist(),
                "num": h.num,
                "min": h.min,
                "max": h.max,
                "sum": h.sum,
                "sum_squares": h.sum_squares,
            }
            path = f"histograms/{_key(name)}/{int(step):09d}.json"
            self.experiment.log_dict(run_id, data, path)

    def after_save_checkpoint(self, path: str, info: Mapping[str, Any]) -> None:
        """Set the tag `checkpoint/last` to `path`; copy the checkpoint as an artifact now
        (`log_model="all"`) or at `close()` (`log_model=True`)."""
        check_open(self, self._closed)
        run_id = self._run()
        self.experiment.set_tag(run_id, CHECKPOINT_TAG, str(path))
        name = str(info.get("name") or os.path.basename(os.path.normpath(path)))
        if self.log_model == "all":
            if not self._copy_checkpoint(path, name):
                report_failure(
                    Notice(
                        f"{self!r} could not copy checkpoint `{path}`: `ModelCheckpoint` "
                        "deleted it (retention) before this logger got to it. Keep more "
                        "checkpoints (`save_top_k`) to have each one copied."
                    )
                )
        elif self.log_model:
            self._checkpoints[str(path)] = name

    def _copy_checkpoint(self, path: str, name: str) -> bool:
        """Copy the checkpoint `path` as the artifact `checkpoints/<name>`, if it is still
        there; returns whether it was."""
        if not os.path.isdir(path):
            return False
        assert self._run_id is not None
        self.experiment.log_artifacts(self._run_id, path, artifact_path=f"checkpoints/{name}")
        return True

    # ------------------------------------------------------------------ resuming
    def resume_from(self, run_id: str) -> "MLFlowLogger":
        """Continue the MLflow run `run_id` as it is (call before anything is logged).
        Returns this logger."""
        if not isinstance(run_id, str) or not run_id:
            raise TypeError(
                f"`run_id` must be a non-empty string (an MLflow run id), got {run_id!r}."
            )
        if self._started and self._run_id != run_id:
            raise RuntimeError(
                f"Cannot continue MLflow run {run_id!r}: {self!r} already writes to run "
                f"{self._run_id!r}. Call `resume_from` before logging anything."
            )
        self._run_id = run_id
        return self

    def resume_at(self, run_id: str | None, records: int) -> int:
        """Continue the run `run_id` after its first `records` records, or start a new one
        that gets every record replayed (see the class docstring); returns how many of the
        `records` the run written to holds.

        With no `run_id` (nothing was logged before the checkpoint), or a run the store does
        not have, a new run starts and 0 is returned.
        """
        check_open(self, self._closed)
        self._send()
        if run_id is None:
            self._run_id, self._started = None, False
            return 0
        from mlflow.exceptions import MlflowException

        client = self.experiment
        try:
            old = client.get_run(run_id)
            if old.info.lifecycle_stage == "deleted":
                raise MlflowException(f"run {run_id!r} has been deleted")
        except MlflowException as error:
            report_failure(
                Notice(
                    f"{self!r} cannot continue MLflow run {run_id!r} (named by the checkpoint): "
                    f"{error}. A new run receives every record again."
                )
            )
            self._run_id, self._started = None, False
            return 0
        held = int(old.data.tags.get(RECORDS_TAG, 0))
        pending = int(old.data.tags.get(PENDING_TAG, held))
        if held == pending and held <= records:
            self._run_id, self._started = run_id, False
            self._run()  # continue it now
            return held
        self.run_name = self.run_name or old.info.run_name
        new_id = self._new_run({**self.tags, RESUMED_FROM_TAG: run_id})
        client.set_tag(run_id, SUPERSEDED_BY_TAG, new_id)
        self._run_id, self._started = new_id, True
        return 0

    # ------------------------------------------------------------------ lifetime
    def flush(self) -> None:
        if not self._closed:
            self._send()

    def close(self) -> None:
        if self._closed:
            return
        if self._started:
            self._send()
            for path, name in self._checkpoints.items():
                self._copy_checkpoint(path, name)
            assert self._run_id is not None
            self.experiment.set_terminated(self._run_id, "FINISHED")
        self._closed = True

    def __repr__(self) -> str:
        return f"MLFlowLogger({self.experiment_name!r}, tracking_uri={self.tracking_uri!r})"
