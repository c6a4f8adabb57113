"""`History`: every published record, in memory as plain lists and on disk as a JSONL file."""

import hashlib
import math
import os
import threading
from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ._closed import check_open
from ._convert import to_floats
from ._failures import Notice, report_failure
from ._hparams import jsonable_hparams
from ._journal import JournalFile, encode, read_prefix
from ._logger import Logger


def _base_name(name: str) -> str:
    """`"train/loss"` -> `"loss"`; a name without a `/` is its own base."""
    return name.split("/", 1)[1] if "/" in name else name


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inline(state: Mapping[str, Any], count: int) -> tuple[list, int, Any]:
    """The records a state holds itself (`"inline"`), checked like a file's."""
    inline = state.get("inline")
    if not isinstance(inline, list) or len(inline) != count:
        held = len(inline) if isinstance(inline, list) else "none"
        raise ValueError(
            f"History state counts {count} record(s) but names no file holding them and holds "
            f"{held} itself; expected the dict returned by `History.state_dict()`."
        )
    digest = hashlib.sha256()
    records = []
    for step, pairs in inline:
        values = {str(k): float(v) for k, v in pairs}
        records.append((int(step), values))
        digest.update(encode(int(step), values))
    if state.get("sha256") not in (None, digest.hexdigest()):
        raise ValueError(
            "The records of this History state do not match its SHA-256: the state was "
            "changed after `History.state_dict()` returned it."
        )
    return records, 0, digest


class History(Logger):
    """Keeps every logged record: in memory as plain dicts of lists, and (once told where
    with `persist_to`) in an append-only JSONL file.

    For each metric name (other than `"epoch"`), entry `i` of

    - `history.metrics[name]` is its `i`-th logged value (a `float`),
    - `history.steps[name]` is the step it was logged at (an `int`),
    - `history.epochs[name]` is the `"epoch"` value logged with it (an `int`; `None` if that
      call had no `"epoch"` key).

    So `zip(history.steps["val/loss"], history.metrics["val/loss"])` is the validation-loss
    curve. `history.hparams` holds the logged hyperparameters (nested as given, values made
    JSON-able). Treat all of these as read-only.

    Each `log_metrics` call is one *record*; `iter_records()` gives them back exactly as
    logged, `(step, {name: float})`, and `num_records` counts them. After `persist_to(path)`
    every record is also a line `{"step": ..., "metrics": {...}}` of the file `path`
    (written as records come, made durable by `flush()`). That file is what a checkpoint
    points to: `state_dict()` is then small (the file, how many records it holds, their
    SHA-256 and the hyperparameters), whatever the length of the run, and `load_state_dict`
    reads the records back from the file (ignoring any written after the checkpoint, which
    the next write cuts off). Without a file, `state_dict()` holds the records themselves.

    The Trainer keeps one as `trainer.history`, fed on a background thread, and persists
    it beside the checkpoints of its first `ModelCheckpoint` (`<dirpath>/history.jsonl`).
    It is safe to read while another thread logs; call the Trainer's (or the
    `AsyncLogger`'s) `flush` first to see everything.

    **Example:**

    ```python
    history = History()
    history.log_metrics({"train/loss": 0.9, "epoch": 0}, step=10)
    history.log_metrics({"train/loss": 0.5, "val/loss": 0.7, "epoch": 1}, step=20)
    history.metrics  # {"train/loss": [0.9, 0.5], "val/loss": [0.7]}
    history.steps    # {"train/loss": [10, 20], "val/loss": [20]}
    history.epochs   # {"train/loss": [0, 1], "val/loss": [1]}
    list(history.iter_records())  # [(10, {"train/loss": 0.9, "epoch": 0.0}), (20, {...})]
    history.plot("curves.png")  # needs matplotlib: pip install 'solstice[plot]'
    ```
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._closed = False
        self._path: str | None = None  # the file persisted to (`persist_to`)
        self._journal: JournalFile | None = None  # writing it, unless another process does
        self._journal_started = False
        self._reported: OSError | None = None  # the journal failure last warned about
        self._reset()

    def _reset(self) -> None:
        self.metrics: dict[str, list[float]] = {}
        self.steps: dict[str, list[int]] = {}
        self.epochs: dict[str, list[int | None]] = {}
        self.hparams: dict[str, Any] = {}
        # One entry per record, to give records back exactly: its keys (in order, "epoch"
        # included; one shared tuple per set of keys), its step and its epoch value.
        self._keys: list[tuple[str, ...]] = []
        self._record_steps = array("q")
        self._record_epochs = array("d")
        self._interned: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._digest = hashlib.sha256()  # of every record's line, in order
        self._source: tuple[str, int] | None = None  # loaded from: (file, bytes of the records)

    @property
    def num_records(self) -> int:
        """How many records (`log_metrics` calls) this history holds."""
        return len(self._keys)

    # ------------------------------------------------------------------ recording
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        values = to_floats(metrics)
        step = int(step)
        line = encode(step, values)
        with self._lock:
            if self._journal is not None:
                self._start_journal()  # (with the records before this one)
            self._append(step, values)
            self._digest.update(line)
            if self._journal is not None:
                self._journal.write(line)
                self._check_journal()

    def _append(self, step: int, values: dict[str, float]) -> None:
        keys = tuple(values)
        keys = self._interned.setdefault(keys, keys)
        epoch_value = values.get("epoch")
        self._keys.append(keys)
        self._record_steps.append(step)
        self._record_epochs.append(math.nan if epoch_value is None else epoch_value)
        epoch = int(epoch_value) if epoch_value is not None and math.isfinite(epoch_value) else None
        for name, value in values.items():
            if name != "epoch":
                self.metrics.setdefault(name, []).append(value)
                self.steps.setdefault(name, []).append(step)
                self.epochs.setdefault(name, []).append(epoch)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        with self._lock:
            self.hparams.update(jsonable_hparams(params))

    def iter_records(
        self, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, dict[str, float]]]:
        """The records `start` to `stop` (default: all), as logged: `(step, {name: float})`,
        the `"epoch"` value among them where it was logged."""
        with self._lock:
            keys, steps, epochs = self._keys, self._record_steps, self._record_epochs
            metrics = dict(self.metrics)  # (lists only grow; `load_state_dict` makes new ones)
            stop = len(keys) if stop is None else min(stop, len(keys))
        seen: dict[str, int] = {}  # how many values of each name come before record `i`
        for names in keys[:start]:
            for name in names:
                seen[name] = seen.get(name, 0) + 1
        for i in range(start, stop):
            values = {}
            for name in keys[i]:
                if name == "epoch":
                    values[name] = epochs[i]
                else:
                    j = seen.get(name, 0)
                    values[name] = metrics[name][j]
                    seen[name] = j + 1
            yield steps[i], values

    def _lines(self, start: int) -> Iterator[bytes]:
        for step, values in self.iter_records(start):
            yield encode(step, values)

    # ------------------------------------------------------------------ the file
    def persist_to(self, path: str | os.PathLike, *, write: bool = True) -> None:
        """Keep every record in the file `path` too (one JSON line each), from now on.

        The file is (re)written at the next record or `flush()` to hold exactly this
        history's records: cut back to them if it is the file this history was loaded from
        (dropping what a stopped run wrote after its checkpoint), else written anew (an
        existing file is replaced). Its directory is created if needed. A write that fails
        (a full disk) is reported with a `RuntimeWarning` and retried at the next `flush()`;
        the records stay in memory meanwhile.

        With `write=False` another process writes the file (with several processes, process 0
        does): this history only names it in `state_dict`, which stays small.
        """
        path = os.path.abspath(os.fspath(path))
        with self._lock:
            self._path = path
            if self._journal is not None:
                if write and self._journal.path == path:
                    return
                self._journal.close()
                self._journal = None
            if write:
                self._journal = JournalFile(path)
                self._journal_started = False

    def _start_journal(self) -> None:
        if self._journal_started:
            return
        self._journal_started = True
        journal, source = self._journal, self._source
        assert journal is not None  # (called only with a journal)
        keep = None  # write the records anew (none: a new, empty file)
        if source is not None and _same_file(source[0], journal.path):
            keep = source[1]  # the file holds them: cut it back to them
        journal.start(self.num_records, keep, self._lines(0))
        self._source = None
        self._check_journal()

    def _check_journal(self) -> None:
        assert self._journal is not None  # (called only with a journal)
        failure = self._journal.failure
        if failure is not None and failure is not self._reported:
            self._reported = failure
            report_failure(
                Notice(
                    f"History could not write its file `{self._journal.path}`: "
                    f"{type(failure).__name__}: {failure}. Every record stays in memory, and "
                    "the file is written again at the next flush (each checkpoint flushes "
                    "it); a checkpoint taken before that succeeds cannot restore the logged "
                    "history. Free space on that disk."
                )
            )

    def flush(self) -> None:
        """Make every record durable in the file (`fsync`), if there is one."""
        with self._lock:
            if self._journal is not None and not self._closed:
                self._start_journal()
                self._journal.flush(self.num_records, self._lines, sync=True)
                self._check_journal()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._closed = True
            if self._journal is not None:
                self._journal.close()

    def resume_at(self, run_id: str | None, records: int) -> int:
        """Keep only the first `records` records (a History given as one of the Trainer's
        `loggers`, resuming); returns how many it holds."""
        with self._lock:
            if self.num_records > records:
                kept, hparams = list(self.iter_records(0, records)), self.hparams
                self._reset()
                self.hparams = hparams
                for step, values in kept:
                    self._append(step, values)
                    self._digest.update(encode(step, values))
                self._journal_started = False  # a file is written anew at the next write
            return self.num_records

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to restore this history, JSON-able: the file (`persist_to`,
        or the one it was loaded from), how many records it holds and their SHA-256, and the
        hyperparameters; flush first so that the file holds them. Without a file, the records
        themselves (`"inline"`): the state then grows with the run, so persist a long one."""
        with self._lock:
            path = self._path
            if path is None and self._source is not None:
                path = self._source[0]
            state: dict[str, Any] = {
                "path": path,
                "records": self.num_records,
                "sha256": self._digest.hexdigest(),
                "hparams": dict(self.hparams),
            }
            if path is None:  # no file holds the records: they travel in the state, as
                # `[step, [[name, value], ...]]` (pairs: checkpoints sort the keys of dicts)
                state["inline"] = [
                    [step, [list(item) for item in values.items()]]
                    for step, values in self.iter_records()
                ]
            return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace what is recorded with the first `state["records"]` records of the file
        `state["path"]` (or those the state holds itself), from `state_dict`, checked against
        `state["sha256"]`.

        Raises `FileNotFoundError` if the file is missing and `ValueError` if it holds fewer
        records or other ones. A file that holds more (records written after the checkpoint
        was taken) is cut back to these at the next write, if this history persists to it.
        A state written by an older Solstice, holding the lists themselves, is accepted.
        """
        if isinstance(state, Mapping) and "metrics" in state:
            self._load_lists(state)
            return
        missing = {"path", "records", "hparams"} - set(state)
        if missing:
            raise ValueError(
                f"History state is missing {sorted(missing)}; expected the dict returned by "
                "`History.state_dict()`."
            )
        path, count = state["path"], int(state["records"])
        if path is None:
            records, offset, digest = _inline(state, count)
        else:
            records, offset, digest = read_prefix(path, count, state.get("sha256"))
        with self._lock:
            self._reset()
            for step, values in records:
                self._append(step, values)
            self._digest = digest
            self.hparams = dict(state["hparams"])
            self._source = None if path is None else (os.path.abspath(path), offset)
            self._journal_started = False  # cut the file back at the next write

    def _load_lists(self, state: Mapping[str, Any]) -> None:
        """A state from before records were kept (the lists themselves): records are rebuilt
        by grouping consecutive values at the same step and epoch."""
        missing = {"metrics", "steps", "epochs", "hparams"} - set(state)
        if missing:
            raise ValueError(
                f"History state is missing {sorted(missing)}; expected the dict returned by "
                "`History.state_dict()`."
            )
        entries = sorted(
            (
                (int(step), order, name, float(value), epoch)
                for order, name in enumerate(state["metrics"])
                for value, step, epoch in zip(
                    state["metrics"][name], state["steps"][name], state["epochs"][name]
                )
            ),
            key=lambda e: e[0],
        )
        groups: list[tuple[int, Any, dict[str, float]]] = []
        for step, _, name, value, epoch in entries:
            if not groups or groups[-1][:2] != (step, epoch) or name in groups[-1][2]:
                groups.append((step, epoch, {}))
            groups[-1][2][name] = value
        with self._lock:
            self._reset()
            for step, epoch, values in groups:
                if epoch is not None:
                    values["epoch"] = float(epoch)
                self._append(step, values)
                self._digest.update(encode(step, values))
            self.hparams = dict(state["hparams"])
            self._journal_started = False

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
        return f"History({len(self.metrics)} metrics, {self.num_records} records)"
