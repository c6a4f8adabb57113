"""The file behind a `History`: one JSON line per record, appended, repaired after a failure.

A record is one `log_metrics` call: `{"step": 10, "metrics": {"train/loss": 0.5, "epoch": 0.0}}`
(every value a float, `NaN`/`Infinity` as Python's `json` writes them), on one line.
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO


def encode(step: int, values: dict[str, float]) -> bytes:
    """The line of one record (ending in a newline)."""
    return (json.dumps({"step": step, "metrics": values}, separators=(",", ":")) + "\n").encode()


def _decode(line: bytes, path: str, number: int) -> tuple[int, dict[str, float]]:
    try:
        record = json.loads(line)
        step = record["step"]
        metrics = record["metrics"]
        if type(step) is not int or not isinstance(metrics, dict):
            raise ValueError("`step` must be an int and `metrics` an object")
        return step, {str(k): float(v) for k, v in metrics.items()}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"Line {number} of the history file `{path}` is not a History record ({error}): "
            f"{line[:200]!r}. The file was changed by something else than Solstice; put back "
            "the one the run wrote."
        ) from None


def read_prefix(
    path: str, count: int, sha256: str | None
) -> tuple[list[tuple[int, dict[str, float]]], int, Any]:
    """The first `count` records of the history file `path`, the byte offset just after them,
    and the running SHA-256 of their lines (a `hashlib` object, to continue).

    Raises `FileNotFoundError` if the file is missing, and `ValueError` if it holds fewer
    than `count` complete lines or if their digest is not `sha256` (it was rewritten by
    another run). Anything after the first `count` lines (later records, a last line cut
    short by a crash) is ignored.
    """
    digest = hashlib.sha256()
    records: list[tuple[int, dict[str, float]]] = []
    offset = 0
    if count:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"The history file `{path}` is missing, but the checkpoint being resumed counts "
                f"{count} record(s) in it. It is written beside the checkpoints (as "
                "`history.jsonl`) and must stay with them: put it back, or resume from a "
                "checkpoint whose history file is there."
            ) from None
        with f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a last line cut short: not a record
                records.append(_decode(line, path, len(records) + 1))
                digest.update(line)
                offset += len(line)
                if len(records) == count:
                    break
        if len(records) < count:
            raise ValueError(
                f"The history file `{path}` holds {len(records)} complete record(s), but the "
                f"checkpoint being resumed counts {count}: the file was truncated or replaced "
                "after the checkpoint was taken. Put back the file the run wrote, or resume "
                "from an earlier checkpoint (it needs fewer records)."
            )
    if sha256 is not None and digest.hexdigest() != sha256:
        raise ValueError(
            f"The first {count} record(s) of the history file `{path}` are not the ones the "
            "checkpoint being resumed was taken with (their SHA-256 differs): the file was "
            "rewritten by another run, e.g. a `fit` started from scratch with the same "
            "checkpoint directory. Resume from a checkpoint of the run that wrote the file "
            "(`ckpt_path='last'`), or put back the file of this checkpoint's run."
        )
    return records, offset, digest


class JournalFile:
    """Appends record lines to a history file.

    Lines are buffered; `flush` hands them to the OS (and `fsync`s). The file is known to hold
    exactly `synced` records (`synced_offset` bytes) after each successful `flush`. A failed
    write or flush (a full disk) closes the file and is remembered in `failure`; the next
    `flush` repairs it: cuts the file back to the last synced point and writes the records
    after it again, from the `lines_from` callback (records are also kept in memory).
    """

    def __init__(self, path: str):
        self.path = path
        self._file: BinaryIO | None = None
        self.synced = 0
        self.synced_offset = 0
        self.failure: OSError | None = None

    def start(self, records: int, keep_bytes: int | None, lines: Iterable[bytes]) -> None:
        """Make the file hold exactly `records` records: its own first `keep_bytes` bytes
        (which hold them) if given, else `lines` (all of them), written anew."""
        self.close()
        self.synced = self.synced_offset = 0
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            if keep_bytes is not None:
                f: BinaryIO = open(self.path, "r+b")
                f.truncate(keep_bytes)
                f.seek(keep_bytes)
            else:
                f = open(self.path, "wb")
                for line in lines:
                    f.write(line)
            self._file = f
            f.flush()
            self.synced, self.synced_offset = records, f.tell()
            self.failure = None
        except OSError as error:
            self._fail(error)

    def write(self, line: bytes) -> None:
        if self._file is not None:
            try:
                self._file.write(line)
            except OSError as error:
                self._fail(error)

    def flush(self, records: int, lines_from: Callable[[int], Iterable[bytes]], sync: bool) -> bool:
        """Make the file hold all `records` records; returns whether it does."""
        try:
            if self._file is None:  # failed before: cut back to what is known good, rewrite
                mode = "r+b" if os.path.exists(self.path) else "w+b"
                f: BinaryIO = open(self.path, mode)  # type: ignore[assignment]
                self._file = f
                f.truncate(self.synced_offset)
                f.seek(self.synced_offset)
                for line in lines_from(self.synced):
                    f.write(line)
            self._file.flush()
            if sync:
                os.fsync(self._file.fileno())
            self.synced, self.synced_offset = records, self._file.tell()
            self.failure = None
            return True
        except OSError as error:
            self._fail(error)
            return False

    def _fail(self, error: OSError) -> None:
        self.failure = error
        self.close()

    def close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()  # (closes the descriptor even when the last flush fails)
            except OSError:
                pass
