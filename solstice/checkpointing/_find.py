"""Finding checkpoints in a directory: the newest valid one, the best by a metric.

Every candidate is verified before it is chosen; a damaged one is reported (with the
damage) and skipped for the next, never loaded, deleted or overwritten.
"""

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._format import CheckpointError, candidates, read_metadata, verify

log = logging.getLogger("solstice")


def _created(path: Path) -> int:
    try:
        return int(read_metadata(path).get("created_unix_ns", 0))
    except CheckpointError:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            # Removed since it was listed: with several processes, process 0 deletes what
            # retention drops (`ModelCheckpoint._delete`) while the others may already be
            # looking for the last checkpoint of their next `fit`. It ranks last.
            return -1


def first_valid(
    candidates: Sequence[Any],
    why: str,
    fetch: Callable[[Any], Path] = Path,
    shown: Callable[[Any], str] = str,
) -> tuple[Path, dict[str, Any]] | None:
    """The first of `candidates` (local paths, or what `fetch` makes a local copy of) that
    verifies as a training checkpoint, with its metadata; a damaged one is reported (as
    `shown(candidate)`) and skipped for the `why` (next) one, never touched."""
    for candidate in candidates:
        path = fetch(candidate)
        try:
            document = verify(path)
        except CheckpointError as error:
            warnings.warn(
                f"Skipping checkpoint `{shown(candidate)}`: {error} It is left untouched; "
                f"looking for the {why} one.",
                RuntimeWarning,
                stacklevel=4,
            )
            continue
        if document.get("kind") == "trainer":
            return path, document
    return None


def find_last(dirpath: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid training checkpoint in `dirpath` (corrupted ones are reported and
    skipped), or `None` if `dirpath` holds no checkpoint at all."""
    found, partial = candidates(dirpath)
    if partial:
        log.info("Ignoring unfinished saves in %s: %s", dirpath, [p.name for p in partial])
    if not found:
        return None
    result = first_valid(sorted(found, key=_created, reverse=True), "previous")
    if result is None:
        raise CheckpointError(
            f"None of the {len(found)} checkpoint(s) in `{dirpath}` is valid (see the warnings "
            "above); they are left untouched. Pass `ckpt_path=` to one you trust or move them "
            "away to start afresh."
        )
    return result


def find_best(
    dirpath: str | os.PathLike, monitor: str, mode: str
) -> tuple[Path, dict[str, Any]] | None:
    """The valid checkpoint in `dirpath` with the best `monitor` score."""
    found, _ = candidates(dirpath)
    scored = []
    for path in found:
        try:
            info = read_metadata(path).get("checkpoint") or {}
        except CheckpointError:
            continue  # reported below if it would have been the best: cannot tell, skip
        score = info.get("score")
        if info.get("monitor") == monitor and isinstance(score, (int, float)):
            scored.append((score, _created(path), path))
    sign = 1 if mode == "max" else -1
    scored.sort(key=lambda t: (sign * t[0], t[1]), reverse=True)
    return first_valid([p for _, _, p in scored], "next best")
