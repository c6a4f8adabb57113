"""`CSVLogger`: metrics as one CSV table, hyperparameters as JSON."""

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from ._closed import check_open
from ._convert import to_floats
from ._hparams import jsonable_hparams
from ._logger import Logger
from ._mirror import mirror_of

_FIXED = ("step", "epoch")
_BUFFER = 1 << 16  # bytes of rows kept in memory before they are handed to the OS


def _atomic_write(path: str, write) -> None:
    """Write a file via a temporary file next to it and `os.replace`, so that readers see
    either the old file or the whole new one."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _complete_size(path: str) -> int:
    """The size of the file `path` without a last line cut short (by a crash or a full disk
    mid-write): up to and including its last newline."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
    return 0


def _is_row(row: list[str], width: int) -> bool:
    """Whether `row` is a data row as this logger writes them under a `width`-column header
    (rows merged by appending to a line cut short are not)."""
    return len(row) == width and row[0].lstrip("-").isdigit()


class CSVLogger(Logger):
    """Writes metrics to one CSV table and hyperparameters to a JSON file.

    `<log_dir>/<filename>` has one row per `log_metrics` call: columns `step` and `epoch`
    (from the `epoch` key, empty when absent), then one column per metric in order of first
    appearance; a metric missing from a call leaves its cell empty. When a new metric
    appears, the file is rewritten with the wider header (atomically: a temporary file,
    then `os.replace`), so no row is lost and the file is always a valid table. Rows are
    appended between header changes; `flush()` makes them visible to readers.

    If the file already exists, new rows are appended to it (after cutting off a last row
    left incomplete by a crash). When the Trainer resumes a run from a checkpoint,
    `resume_at` first brings the table back to the rows that checkpoint counts (see there),
    so a resumed run's table equals the one of a run that never stopped.

    `<log_dir>/hparams.json` holds the hyperparameters (nested as given; values that are not
    numbers, bools or strings are stored as strings), updated by each `log_hyperparams`.

    **Arguments:**

    - `log_dir`: the directory for this run's files (created at the first write).
    - `filename`: the name of the metrics file.

    **Example:**

    ```python
    logger = CSVLogger("runs/exp1")
    logger.log_metrics({"train/loss": 0.5, "epoch": 0}, step=10)
    logger.log_metrics({"val/loss": 0.6, "epoch": 0}, step=10)  # adds a column
    logger.close()
    # runs/exp1/metrics.csv:
    # step,epoch,train/loss,val/loss
    # 10,0,0.5,
    # 10,0,,0.6
    ```
    """

    def __init__(self, log_dir: str | os.PathLike, *, filename: str = "metrics.csv"):
        if not filename or os.path.basename(filename) != filename:
            raise ValueError(
                f"`filename` must be a plain file name such as 'metrics.csv', got {filename!r}; "
                "put directories in `log_dir`."
            )
        # a URL: written to a local copy, uploaded at every flush (see `Mirror`)
        self._mirror = mirror_of(log_dir, "CSVLogger(log_dir=...)")
        self.log_dir: str = self._mirror.local
        self.path = os.path.join(self.log_dir, filename)
        self.hparams_path = os.path.join(self.log_dir, "hparams.json")
        self._columns: list[str] = list(_FIXED)
        self._hparams: dict[str, Any] = {}
        if os.path.exists(self.path):
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            if header is not None:
                if tuple(header[:2]) != _FIXED:
                    raise ValueError(
                        f"{self.path!r} exists but is not a CSVLogger table: its header "
                        f"{header!r} does not start with 'step,epoch'. Choose another "
                        "`log_dir` or `filename`."
                    )
                self._columns = header
        if os.path.exists(self.hparams_path):
            with open(self.hparams_path, encoding="utf-8") as f:
                self._hparams = json.load(f)
        self._index = {column: i for i, column in enumerate(self._columns)}
        self._file: Any = None  # opened by the first write (see `_start`)
        self._closed = False

    def _start(self) -> None:
        """Create the directory and the table at the first write, not at construction: a
        logger built on every process of a multi-process run (where only process 0 writes)
        leaves nothing behind on the others."""
        os.makedirs(self.log_dir, exist_ok=True)
        if os.path.exists(self.path):
            size = _complete_size(self.path)
            if size < os.path.getsize(self.path):  # never append to a row cut short
                os.truncate(self.path, size)
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            _atomic_write(self.path, lambda f: csv.writer(f).writerow(self._columns))
        self._open()

    def _open(self) -> None:
        # Rows are buffered in memory (written to the OS every `_BUFFER` bytes, to the disk at
        # `flush()`/`close()`), never flushed one by one.
        self._file = open(self.path, "a", newline="", encoding="utf-8", buffering=_BUFFER)
        self._writerow = csv.writer(self._file).writerow

    def _widen(self, new_columns: list[str]) -> None:
        self._file.close()
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        columns = self._columns + new_columns
        pad = [""] * len(new_columns)

        def write(f) -> None:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(row + pad for row in rows)

        _atomic_write(self.path, write)
        self._columns = columns
        self._index = {column: i for i, column in enumerate(columns)}
        self._open()

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        if "step" in metrics:
            raise ValueError(
                f"CSVLogger got a metric named 'step' (value {metrics['step']!r}), but the "
                "`step` column holds the `step` argument. Rename the metric, e.g. "
                "'train/step'."
            )
        values = to_floats(metrics)
        if self._file is None:
            self._start()
        index = self._index
        if not index.keys() >= values.keys():
            self._widen([key for key in values if key not in index])
            index = self._index
        row = [""] * len(index)
        row[0] = str(int(step))
        for key, value in values.items():
            row[index[key]] = (
                str(int(value)) if value.is_integer() and math.isfinite(value) else repr(value)
            )
        self._writerow(row)

    def resume_at(self, run_id: str | None, records: int) -> int:
        """Bring the table back to its first `records` data rows (one per record), for a run
        resuming from a checkpoint that counts that many records; returns how many it holds.

        Rows written after the checkpoint are removed (the resumed run writes them again), a
        last row cut short by a crash or a full disk is removed, and so is anything after a
        malformed row. The header keeps only the columns those rows use, as a run that never
        stopped would have it. If the table holds fewer rows (some were still buffered when
        the process was killed), it returns that number: the Trainer replays the others.
        The table is rewritten atomically, only when something changes.
        """
        check_open(self, self._closed)
        if self._file is not None:
            self._file.close()
            self._file = None
        self._columns = list(_FIXED)
        if not os.path.exists(self.path):
            self._index = {column: i for i, column in enumerate(self._columns)}
            return 0
        with open(self.path, newline="", encoding="utf-8") as f:
            text = f.read()
        complete = text[: text.rfind("\n") + 1]
        table = list(csv.reader(io.StringIO(complete)))
        header = table[0] if table else list(_FIXED)
        if tuple(header[:2]) != _FIXED:
            raise ValueError(
                f"{self.path!r} exists but is not a CSVLogger table: its header {header!r} "
                "does not start with 'step,epoch'. Choose another `log_dir` or `filename`."
            )
        kept = []
        for row in table[1 : records + 1]:
            if not _is_row(row, len(header)):
                break
            kept.append(row)
        used = [i for i in range(2, len(header)) if any(row[i] for row in kept)]
        keep = [0, 1, *used]
        columns = [header[i] for i in keep]
        if len(complete) != len(text) or columns != header or len(kept) != len(table) - 1:

            def write(f) -> None:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows([row[i] for i in keep] for row in kept)

            _atomic_write(self.path, write)
        self._columns = columns
        self._index = {column: i for i, column in enumerate(columns)}
        return len(kept)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        self._hparams.update(jsonable_hparams(params))
        text = json.dumps(self._hparams, indent=2, sort_keys=True)
        os.makedirs(self.log_dir, exist_ok=True)
        _atomic_write(self.hparams_path, lambda f: f.write(text + "\n"))

    def flush(self) -> None:
        if not self._closed and self._file is not None:
            self._file.flush()
            self._mirror.push()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            self._mirror.push()

    @property
    def run_id(self) -> str:
        """The log directory (its URL on remote storage)."""
        return self._mirror.location

    def __repr__(self) -> str:
        return f"CSVLogger({self._mirror.location!r})"
